"""Model spec: the facts about an MoE model that a policy is resolved against.

A :class:`ModelSpec` carries only what routing and cost accounting need (which
layers are MoE, experts, top-k, the model's own scoring rule, expert size).
It is loaded from a Hugging Face ``config.json`` or taken from a preset whose
numbers come from the published configs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

ScoringFunc = Literal["softmax", "sigmoid"]


class SpecError(ValueError):
    """A model spec (config.json, preset name or JSON dict) that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """What sgl_budget needs to know about an MoE model.

    ``moe_layers`` holds the *real* decoder-layer indices of the MoE layers
    (DeepSeek's first dense layers are absent from it). Grouped top-k is on
    when ``n_group > 1``; ``topk_group`` groups are kept per token. The
    correction bias itself is a weight, not a config value: ``has_correction_bias``
    says whether the model selects experts with ``sigmoid + bias`` (DeepSeek-V3
    ``noaux_tc``).
    """

    name: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    scoring_func: ScoringFunc = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False
    dtype_bytes: int = 2
    model_type: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        problems = []
        if self.num_layers < 1:
            problems.append("num_layers must be >= 1")
        if not self.moe_layers:
            problems.append("the model has no MoE layers")
        if any(i < 0 or i >= self.num_layers for i in self.moe_layers):
            problems.append(f"moe_layers must lie in 0..{self.num_layers - 1}")
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            problems.append("moe_layers must be strictly increasing")
        if self.num_experts < 1:
            problems.append("num_experts must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k must lie in 1..num_experts ({self.num_experts})")
        if self.scoring_func not in ("softmax", "sigmoid"):
            problems.append(f"scoring_func must be softmax or sigmoid, not {self.scoring_func!r}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            problems.append("n_group must divide num_experts")
        if not 1 <= self.topk_group <= self.n_group:
            problems.append("topk_group must lie in 1..n_group")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            problems.append("top_k exceeds the experts in the kept groups")
        if problems:
            raise SpecError(f"invalid model spec {self.name!r}: " + "; ".join(problems))

    # -- derived facts -------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size * self.dtype_bytes

    @property
    def shared_expert_bytes(self) -> int:
        """Bytes of the shared expert weights one MoE layer reads every step."""
        inter = self.shared_expert_intermediate_size or self.num_shared_experts * self.moe_intermediate_size
        return 3 * self.hidden_size * inter * self.dtype_bytes

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def layer_coverage_problems(self, layers) -> list[str]:
        """What is wrong with a per-layer file covering ``layers``: MoE layers it lacks, layers that are not MoE."""
        problems = []
        missing = [l for l in self.moe_layers if l not in layers]
        if missing:
            problems.append(f"it lacks MoE layers {missing[:8]}{'...' if len(missing) > 8 else ''}")
        extra = [l for l in layers if not self.is_moe_layer(l)]
        if extra:
            problems.append(f"its layers {extra[:8]} are not MoE layers of {self.name}")
        return problems

    # -- (de)serialisation ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"unknown model spec fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise SpecError(f"incomplete model spec: {e}") from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, name: str | None = None) -> "ModelSpec":
        """Build a spec from a Hugging Face ``config.json`` (dict, file or model dir)."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text())
            except FileNotFoundError:
                raise SpecError(f"{path}: no such config file") from None
            except json.JSONDecodeError as e:
                raise SpecError(f"{path}: not valid JSON ({e})") from None
            name = name or path.parent.name
        try:
            return _from_hf(config, name or str(config.get("_name_or_path") or config.get("model_type", "model")))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SpecError):
                raise
            raise SpecError(f"config of model_type {config.get('model_type')!r} lacks or garbles a field "
                            f"sgl_budget needs: {e!r}") from None


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _from_hf(cfg: dict[str, Any], name: str) -> ModelSpec:
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}
    mt = str(cfg.get("model_type", ""))
    n_layers = _get(cfg, "num_hidden_layers", "n_layers")
    n_experts = _get(cfg, "n_routed_experts", "num_experts", "num_local_experts")
    top_k = _get(cfg, "num_experts_per_tok", "moe_topk", "top_k")
    hidden = _get(cfg, "hidden_size", "d_model")
    if n_layers is None or n_experts is None or top_k is None or hidden is None:
        raise SpecError(
            f"config of model_type {mt!r} is not an MoE config sgl_budget understands "
            "(needs num_hidden_layers, num_experts/n_routed_experts/num_local_experts, num_experts_per_tok, hidden_size)"
        )
    n_layers, n_experts, top_k = int(n_layers), int(n_experts), int(top_k)

    if mt.startswith("deepseek"):
        first_dense = int(_get(cfg, "first_k_dense_replace", default=0))
        freq = int(_get(cfg, "moe_layer_freq", default=1))
        moe_layers = [i for i in range(n_layers) if i >= first_dense and i % freq == 0]
        inter = int(_get(cfg, "moe_intermediate_size"))
        n_shared = int(_get(cfg, "n_shared_experts", default=0))
        scoring = _get(cfg, "scoring_func", default="softmax" if mt == "deepseek_v2" else "sigmoid")
        topk_method = _get(cfg, "topk_method", default="greedy" if mt == "deepseek_v2" else "noaux_tc")
        n_group = int(_get(cfg, "n_group", default=1))
        topk_group = int(_get(cfg, "topk_group", default=1))
        if topk_method == "greedy":
            n_group = topk_group = 1
        return ModelSpec(
            name=name, num_layers=n_layers, moe_layers=tuple(moe_layers), num_experts=n_experts, top_k=top_k,
            hidden_size=int(hidden), moe_intermediate_size=inter, num_shared_experts=n_shared,
            shared_expert_intermediate_size=n_shared * inter, scoring_func=scoring,
            norm_topk_prob=bool(_get(cfg, "norm_topk_prob", default=False)), n_group=n_group,
            topk_group=topk_group, routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", default=1.0)),
            has_correction_bias=(topk_method == "noaux_tc"), model_type=mt,
        )
    if mt in ("mixtral", "minimax", "phimoe"):
        return ModelSpec(
            name=name, num_layers=n_layers, moe_layers=tuple(range(n_layers)), num_experts=n_experts,
            top_k=top_k, hidden_size=int(hidden), moe_intermediate_size=int(cfg["intermediate_size"]),
            norm_topk_prob=True, model_type=mt,
        )
    # Qwen2-MoE / Qwen3-MoE / OLMoE and similar: sparse every `decoder_sparse_step`
    # layers except `mlp_only_layers`.
    step = int(_get(cfg, "decoder_sparse_step", default=1)) or 1
    mlp_only = set(_get(cfg, "mlp_only_layers", default=[]) or [])
    moe_layers = [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]
    inter = int(_get(cfg, "moe_intermediate_size", "intermediate_size"))
    shared_inter = int(_get(cfg, "shared_expert_intermediate_size", default=0))
    default_norm = False  # the transformers default for Qwen2-MoE, Qwen3-MoE and OLMoE configs
    return ModelSpec(
        name=name, num_layers=n_layers, moe_layers=tuple(moe_layers), num_experts=n_experts, top_k=top_k,
        hidden_size=int(hidden), moe_intermediate_size=inter, num_shared_experts=1 if shared_inter else 0,
        shared_expert_intermediate_size=shared_inter,
        norm_topk_prob=bool(_get(cfg, "norm_topk_prob", default=default_norm)), model_type=mt,
    )


# Numbers from the models' published config.json files.
PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            name="deepseek-v2-lite", num_layers=27, moe_layers=tuple(range(1, 27)), num_experts=64, top_k=6,
            hidden_size=2048, moe_intermediate_size=1408, num_shared_experts=2,
            shared_expert_intermediate_size=2 * 1408, scoring_func="softmax", norm_topk_prob=False,
            routed_scaling_factor=1.0, model_type="deepseek_v2",
        ),
        ModelSpec(
            name="deepseek-v3", num_layers=61, moe_layers=tuple(range(3, 61)), num_experts=256, top_k=8,
            hidden_size=7168, moe_intermediate_size=2048, num_shared_experts=1,
            shared_expert_intermediate_size=2048, scoring_func="sigmoid", norm_topk_prob=True, n_group=8,
            topk_group=4, routed_scaling_factor=2.5, has_correction_bias=True, dtype_bytes=1,
            model_type="deepseek_v3",
        ),
        ModelSpec(
            name="qwen3-30b-a3b", num_layers=48, moe_layers=tuple(range(48)), num_experts=128, top_k=8,
            hidden_size=2048, moe_intermediate_size=768, norm_topk_prob=True, model_type="qwen3_moe",
        ),
        ModelSpec(
            name="qwen1.5-moe-a2.7b", num_layers=24, moe_layers=tuple(range(24)), num_experts=60, top_k=4,
            hidden_size=2048, moe_intermediate_size=1408, num_shared_experts=1,
            shared_expert_intermediate_size=5632, norm_topk_prob=False, model_type="qwen2_moe",
        ),
        ModelSpec(
            name="mixtral-8x7b", num_layers=32, moe_layers=tuple(range(32)), num_experts=8, top_k=2,
            hidden_size=4096, moe_intermediate_size=14336, norm_topk_prob=True, model_type="mixtral",
        ),
        ModelSpec(
            name="olmoe-1b-7b", num_layers=16, moe_layers=tuple(range(16)), num_experts=64, top_k=8,
            hidden_size=2048, moe_intermediate_size=1024, norm_topk_prob=False, model_type="olmoe",
        ),
    ]
}


def load_spec(ref: str | Path | ModelSpec | dict[str, Any]) -> ModelSpec:
    """Resolve ``ref``: a ModelSpec, a preset name, a config.json / model dir, or a spec dict."""
    if isinstance(ref, ModelSpec):
        return ref
    if isinstance(ref, dict):
        return ModelSpec.from_dict(ref) if "moe_layers" in ref else ModelSpec.from_hf_config(ref)
    key = str(ref).lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(ref)
    if path.exists():
        return ModelSpec.from_hf_config(path)
    raise SpecError(
        f"unknown model spec {str(ref)!r}: not a preset ({', '.join(PRESETS)}) and no such config.json or model directory"
    )
