"""Model spec: the facts about an MoE model that a policy is resolved against.

A :class:`ModelSpec` carries only what routing and cost accounting need (which
layers are MoE, experts, top-k, the model's own scoring rule, expert size).
It is loaded from a Hugging Face ``config.json`` or taken from a preset whose
numbers come from the published configs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from .families import family_of
from .datacheck import decode_utf8, describe, int_problem, is_int, is_number, parse_json

ScoringFunc = Literal["softmax", "sigmoid", "sqrtsoftplus"]
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")


class SpecError(ValueError):
    """A model spec (config.json, preset name or JSON dict) that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """What sgl_budget needs to know about an MoE model.

    ``moe_layers`` holds the *real* decoder-layer indices of the MoE layers a policy
    routes (DeepSeek's first dense layers are absent from it, and so are DeepSeek-V4's
    hash-routed layers, whose experts a fixed token-id table picks: no policy can
    change them, so every tool leaves them as the model runs them). Grouped top-k is on
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
    # Gemma 4: after renormalisation each slot's weight is multiplied by a learned per-expert scale of its expert
    # (a weight, like the correction bias; the engines apply it: sgl_budget.routing.scoring.apply_expert_scale)
    has_expert_scale: bool = False

    def __post_init__(self) -> None:
        problems = _field_problems(self)
        if not problems:
            object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
            object.__setattr__(self, "routed_scaling_factor", float(self.routed_scaling_factor))
            problems = _range_problems(self)
        if problems:
            raise SpecError(f"invalid model spec {describe(self.name)}: " + "; ".join(problems))

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
        """A spec from its ``to_dict`` form (e.g. a trace's metadata); every bad field is a SpecError."""
        if not isinstance(d, dict):
            raise SpecError(f"a model spec is a JSON object of ModelSpec fields, not {describe(d)}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"unknown model spec fields: {', '.join(sorted(map(str, unknown)))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise SpecError(f"incomplete model spec: {e}") from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, name: str | None = None) -> "ModelSpec":
        """Build a spec from a Hugging Face ``config.json`` (dict, file or model dir); errors name the file."""
        where = "config"
        if not isinstance(config, dict):
            config, file = _read_config(Path(config))
            where, name = str(file), name or file.parent.name
        if not isinstance(config, dict):
            raise SpecError(f"{where}: a config.json is a JSON object, not {describe(config)}")
        try:
            return _from_hf(config, name or _default_name(config))
        except SpecError as e:
            raise (e if where == "config" else SpecError(f"{where}: {e}")) from None


_INT_FIELDS = {  # field -> (minimum, maximum); maxima far above any real model keep every later loop bounded
    "num_layers": (1, 100_000), "num_experts": (1, 1 << 16), "top_k": (1, 1 << 16), "hidden_size": (1, 1 << 24),
    "moe_intermediate_size": (1, 1 << 24), "num_shared_experts": (0, 1 << 16),
    "shared_expert_intermediate_size": (0, 1 << 30), "n_group": (1, 1 << 16), "topk_group": (1, 1 << 16),
    "dtype_bytes": (1, 16),
}


def _field_problems(s: ModelSpec) -> list[str]:
    """Type and bound problems of each field (checked before any arithmetic, so nothing can raise)."""
    problems = [p for f, (lo, hi) in _INT_FIELDS.items() if (p := int_problem(f, getattr(s, f), lo, hi))]
    for f in ("name", "model_type"):
        if not isinstance(getattr(s, f), str):
            problems.append(f"{f} must be a string, not {describe(getattr(s, f))}")
    for f in ("norm_topk_prob", "has_correction_bias", "has_expert_scale"):
        if not isinstance(getattr(s, f), bool):
            problems.append(f"{f} must be true or false, not {describe(getattr(s, f))}")
    if not is_number(s.routed_scaling_factor) or not s.routed_scaling_factor > 0:
        problems.append(f"routed_scaling_factor must be a finite number > 0, not {describe(s.routed_scaling_factor)}")
    layers = s.moe_layers
    if not isinstance(layers, (list, tuple, range)) or not all(is_int(i) for i in layers):
        problems.append(f"moe_layers must be a list of integer layer indices, not {describe(layers)}"
                        + (f" holding {describe(next(i for i in layers if not is_int(i)))}"
                           if isinstance(layers, (list, tuple)) else ""))
    return problems


def _range_problems(s: ModelSpec) -> list[str]:
    """Problems between fields (layers inside the model, top_k within the experts, groups dividing them)."""
    problems = []
    if not s.moe_layers:
        problems.append("the model has no MoE layers")
    if any(i < 0 or i >= s.num_layers for i in s.moe_layers):
        problems.append(f"moe_layers must lie in 0..{s.num_layers - 1}")
    if list(s.moe_layers) != sorted(set(s.moe_layers)):
        problems.append("moe_layers must be strictly increasing")
    if not 1 <= s.top_k <= s.num_experts:
        problems.append(f"top_k must lie in 1..num_experts ({s.num_experts})")
    if s.scoring_func not in SCORING_FUNCS:
        problems.append(f"scoring_func must be softmax, sigmoid or sqrtsoftplus, not {describe(s.scoring_func)}")
    if s.num_experts % s.n_group:
        problems.append("n_group must divide num_experts")
    if not 1 <= s.topk_group <= s.n_group:
        problems.append("topk_group must lie in 1..n_group")
    if s.n_group > 1 and s.top_k > s.topk_group * (s.num_experts // s.n_group):
        problems.append("top_k exceeds the experts in the kept groups")
    return problems


def _read_config(path: Path) -> tuple[Any, Path]:
    """The parsed JSON of a config.json (or a model directory's) and its path; every failure is a SpecError."""
    file = path
    try:
        file = path / "config.json" if path.is_dir() else path
        return parse_json(decode_utf8(file.read_bytes())), file
    except FileNotFoundError:
        raise SpecError(f"{file}: no such config file") from None
    except OSError as e:
        raise SpecError(f"{file}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise SpecError(f"{file}: {e}") from None


def _default_name(cfg: dict[str, Any]) -> str:
    """The model's name for messages: ``_name_or_path`` or ``model_type`` when they are strings."""
    for key in ("_name_or_path", "model_type"):
        if isinstance(cfg.get(key), str) and cfg[key]:
            return cfg[key]
    return "model"


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


class _Fields:
    """Reads typed config fields, collecting every problem (so a config with several is reported at once)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg, self.problems = cfg, []

    def _first(self, keys: tuple[str, ...]) -> tuple[str, Any]:
        return next(((k, self.cfg[k]) for k in keys if self.cfg.get(k) is not None), (keys[0], None))

    def integer(self, *keys: str, default: int | None = None, lo: int = 1, hi: int = 1 << 30) -> int:
        """The first present key's value as an integer in [lo, hi]; a missing field without default is a problem."""
        key, v = self._first(keys)
        if v is None:
            if default is None:
                self.problems.append(f"{'/'.join(keys)} is missing")
            return default if default is not None else lo
        problem = int_problem(key, v, lo, hi)
        if problem:
            self.problems.append(problem)
            return lo
        return int(v)

    def _typed(self, key: str, ok: Callable[[Any], bool], what: str) -> tuple[bool, Any]:
        """``(present, value)``; a present value failing ``ok`` is a problem and reads as None."""
        v = self.cfg.get(key)
        if v is not None and not ok(v):
            self.problems.append(f"{key} must be {what}, not {describe(v)}")
            return True, None
        return v is not None, v

    def flag(self, key: str, default: bool) -> bool:
        present, v = self._typed(key, lambda v: isinstance(v, bool), "true or false")
        return v is True if present else default

    def text(self, key: str, default: str) -> str:
        v = self._typed(key, lambda v: isinstance(v, str), "a string")[1]
        return default if v is None else v

    def number(self, key: str, default: float) -> float:
        v = self._typed(key, lambda v: is_number(v) and v > 0, "a finite number > 0")[1]
        return default if v is None else float(v)

    def layer_list(self, key: str) -> set[int]:
        v = self.cfg.get(key)
        if v is None:
            return set()
        if not isinstance(v, list) or not all(is_int(i) and i >= 0 for i in v):
            self.problems.append(f"{key} must be a list of layer indices, not {describe(v)}")
            return set()
        return set(v)


_CORE = ("num_hidden_layers", "num_experts", "num_experts_per_tok", "hidden_size")
# reader -> (routed-expert count keys, top-k keys), first present wins; "" is every other reader's
_COUNT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "": (("n_routed_experts", "num_experts", "num_local_experts"), ("num_experts_per_tok", "moe_topk", "top_k")),
    # ERNIE-4.5's own keys; transformers' attribute_map aliases them as num_experts / num_experts_per_tok
    "ernie": (("moe_num_experts", "num_experts"), ("moe_k", "num_experts_per_tok")),
    # Kimi Linear's checkpoint keys (SGLang's and transformers' configs alias num_experts_per_tok to the first)
    "kimi_linear": (("num_experts", "n_routed_experts", "num_local_experts"),
                    ("num_experts_per_token", "num_experts_per_tok")),
    "gemma4": (("num_experts",), ("top_k_experts",)),  # Gemma 4's text config (null in its dense models)
}


def _from_hf(cfg: dict[str, Any], name: str) -> ModelSpec:
    outer = cfg.get("model_type")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        # a refused wrapper (Kimi K3) stays refused even when its text model's own type would read (kimi_linear)
        outer_fam = family_of(outer) if isinstance(outer, str) else None
        if outer_fam is not None and outer_fam.config == "unsupported":
            _unsupported_fields(_Fields(cfg), outer, 0)
        cfg = {**cfg, **cfg["text_config"]}
    f = _Fields(cfg)
    mt = f.text("model_type", "")
    fam = family_of(mt)
    if fam is not None and fam.config == "unsupported":
        _unsupported_fields(f, mt, 0)
    if fam is not None and fam.config == "hunyuan":
        cfg = _uniform_layer_lists(cfg, ("moe_topk", "moe_intermediate_size", "num_shared_expert", "num_experts"))
        f = _Fields(cfg)
    reader = fam.config if fam is not None else _UNKNOWN_FAMILY_READERS.get(mt, "qwen")
    expert_keys, topk_keys = _COUNT_KEYS.get(reader, _COUNT_KEYS[""])
    if any(_get(cfg, *keys) is None for keys in (("num_hidden_layers", "n_layers"), expert_keys, topk_keys,
                                                  ("hidden_size", "d_model"))):
        needs = ("num_experts/n_routed_experts/num_local_experts, num_experts_per_tok" if reader not in _COUNT_KEYS
                 else f"{'/'.join(expert_keys)}, {'/'.join(topk_keys)}")
        raise SpecError(
            f"config of model_type {mt!r} is not an MoE config sgl_budget understands "
            f"(needs num_hidden_layers, {needs}, hidden_size)"
        )
    n_layers = f.integer("num_hidden_layers", "n_layers", hi=100_000)
    n_experts = f.integer(*expert_keys, hi=1 << 16)
    top_k = f.integer(*topk_keys, hi=1 << 16)
    hidden = f.integer("hidden_size", "d_model", hi=1 << 24)
    common = dict(name=name, num_layers=n_layers, num_experts=n_experts, top_k=top_k, hidden_size=hidden,
                  model_type=mt)
    kw = _READERS[reader](f, mt, n_layers)
    if f.problems:
        raise SpecError(f"config of model_type {mt!r} lacks or garbles fields sgl_budget needs: "
                        + "; ".join(f.problems))
    return ModelSpec(**common, **kw)


def _all_layers_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """Mixtral-style: every layer is MoE, experts of ``intermediate_size``, always renormalised."""
    return dict(moe_layers=tuple(range(n_layers)), moe_intermediate_size=f.integer("intermediate_size", hi=1 << 24),
                norm_topk_prob=True)


def _deepseek_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """DeepSeek-V2/V3: dense first layers, then MoE every ``moe_layer_freq``; groups unless greedy."""
    first_dense = f.integer("first_k_dense_replace", default=0, lo=0, hi=100_000)
    freq = f.integer("moe_layer_freq", default=1, hi=100_000)
    inter = f.integer("moe_intermediate_size", hi=1 << 24)
    n_shared = f.integer("n_shared_experts", default=0, lo=0, hi=1 << 16)
    scoring = f.text("scoring_func", "softmax" if mt == "deepseek_v2" else "sigmoid")
    topk_method = f.text("topk_method", "greedy" if mt == "deepseek_v2" else "noaux_tc")
    n_group = f.integer("n_group", default=1, hi=1 << 16)
    topk_group = f.integer("topk_group", default=1, hi=1 << 16)
    if topk_method == "greedy":
        n_group = topk_group = 1
    return dict(
        moe_layers=tuple(i for i in range(n_layers) if i >= first_dense and i % freq == 0),
        moe_intermediate_size=inter, num_shared_experts=n_shared, shared_expert_intermediate_size=n_shared * inter,
        scoring_func=scoring, norm_topk_prob=f.flag("norm_topk_prob", False), n_group=n_group,
        topk_group=topk_group, routed_scaling_factor=f.number("routed_scaling_factor", 1.0),
        has_correction_bias=(topk_method == "noaux_tc"),
    )


def _qwen_fields(f: _Fields, mt: str, n_layers: int, norm_default: bool = False,
                 always_renorm: bool = False) -> dict[str, Any]:
    """Qwen2-MoE / Qwen3-MoE / OLMoE and similar: sparse every ``decoder_sparse_step`` layers but ``mlp_only_layers``.

    ``norm_topk_prob`` defaults to False (the transformers default of Qwen2-MoE, Qwen3-MoE and OLMoE configs), to
    True for Qwen3-Next; Qwen3.5-MoE always renormalises (its config has no such field).
    """
    step = f.integer("decoder_sparse_step", default=1, hi=100_000)
    mlp_only = f.layer_list("mlp_only_layers")
    shared_inter = f.integer("shared_expert_intermediate_size", default=0, lo=0, hi=1 << 30)
    return dict(
        moe_layers=tuple(i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0),
        moe_intermediate_size=f.integer("moe_intermediate_size", "intermediate_size", hi=1 << 24),
        num_shared_experts=1 if shared_inter else 0, shared_expert_intermediate_size=shared_inter,
        norm_topk_prob=True if always_renorm else f.flag("norm_topk_prob", norm_default),
    )


def _glm4_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """GLM-4.5/4.6/4.7 and GLM-4.7-Flash: DeepSeek-V3's rule (sigmoid + correction bias, groups, scaling) with no
    ``scoring_func`` / ``topk_method`` fields; dense first layers (``mlp_layer_types`` when the config has it)."""
    first_dense = f.integer("first_k_dense_replace", default=0, lo=0, hi=100_000)
    inter = f.integer("moe_intermediate_size", hi=1 << 24)
    n_shared = f.integer("n_shared_experts", default=0, lo=0, hi=1 << 16)
    kinds = f.cfg.get("mlp_layer_types")
    if isinstance(kinds, list) and len(kinds) == n_layers and all(k in ("dense", "sparse") for k in kinds):
        moe_layers = tuple(i for i, k in enumerate(kinds) if k == "sparse")
    else:
        moe_layers = tuple(range(first_dense, n_layers))
    return dict(
        moe_layers=moe_layers, moe_intermediate_size=inter, num_shared_experts=n_shared,
        shared_expert_intermediate_size=n_shared * inter, scoring_func="sigmoid",
        norm_topk_prob=f.flag("norm_topk_prob", True), n_group=f.integer("n_group", default=1, hi=1 << 16),
        topk_group=f.integer("topk_group", default=1, hi=1 << 16),
        routed_scaling_factor=f.number("routed_scaling_factor", 1.0), has_correction_bias=True,
    )


def _minimax_m2_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """MiniMax-M2: every layer MoE, sigmoid (+ correction bias with ``use_routing_bias``), always renormalised."""
    return dict(moe_layers=tuple(range(n_layers)), moe_intermediate_size=f.integer("intermediate_size", hi=1 << 24),
                scoring_func=f.text("scoring_func", "sigmoid"), norm_topk_prob=True,
                has_correction_bias=f.flag("use_routing_bias", False))


def _ernie_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """ERNIE-4.5-MoE: softmax scores, selection by softmax + correction bias (``moe_statics``), always renormalised,
    no groups or scaling; ``moe_num_shared_experts`` shared MLPs of ``moe_intermediate_size``.

    MoE layers as SGLang's ernie4.py picks them: ``start <= i <= end and (i - start) % interval == 0`` (an end of -1
    is the last layer, as transformers' config resolves it). transformers picks ``(i + 1) % interval == 0`` in the same
    range: equal for interval 1 (every published config); the adapter refuses a model whose layers differ."""
    start = f.integer("moe_layer_start_index", default=1, lo=0, hi=100_000)
    end = f.integer("moe_layer_end_index", default=n_layers - 1, lo=-1, hi=100_000)
    end = n_layers - 1 if end == -1 else end
    interval = f.integer("moe_layer_interval", default=1, hi=100_000)
    inter = f.integer("moe_intermediate_size", hi=1 << 24)
    n_shared = f.integer("moe_num_shared_experts", default=2, lo=0, hi=1 << 16)  # transformers' default
    return dict(moe_layers=tuple(i for i in range(n_layers) if start <= i <= end and (i - start) % interval == 0),
                moe_intermediate_size=inter, num_shared_experts=n_shared,
                shared_expert_intermediate_size=n_shared * inter, scoring_func="softmax", norm_topk_prob=True,
                has_correction_bias=True)


def _uniform_layer_lists(cfg: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``cfg`` with per-layer lists (Hunyuan's ``moe_topk: [8, 8, ...]``) that hold one value turned into that value;
    a list whose layers differ is a SpecError (a spec has one top-k and one expert size)."""
    out = dict(cfg)
    for key in keys:
        v = cfg.get(key)
        if isinstance(v, list) and v:
            if any(x != v[0] for x in v):
                raise SpecError(f"{key} differs between layers ({describe(v)}): sgl_budget's model spec has one value "
                                "per model")
            out[key] = v[0]
    return out


def _hunyuan_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """Hunyuan-A13B: every layer MoE, softmax top-k always renormalised, ``num_shared_expert`` MLPs of
    ``intermediate_size`` beside the routed experts (``use_mixed_mlp_moe``)."""
    inter = f.integer("intermediate_size", hi=1 << 24)
    n_shared = f.integer("num_shared_expert", default=1, lo=0, hi=1 << 16) if f.flag("use_mixed_mlp_moe", False) else 0
    return dict(moe_layers=tuple(range(n_layers)), moe_intermediate_size=f.integer("moe_intermediate_size",
                                                                                    "intermediate_size", hi=1 << 24),
                num_shared_experts=n_shared, shared_expert_intermediate_size=n_shared * inter, norm_topk_prob=True)


def _kimi_linear_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """Kimi Linear: DeepSeek-V3's rule under its own key names. Both engines always select with sigmoid + correction
    bias (``gate.e_score_correction_bias``) through the grouped path: SGLang's ``KimiMoE`` builds
    ``TopK(use_grouped_topk=True, correction_bias=...)`` whatever ``use_grouped_topk`` / ``topk_method`` /
    ``moe_router_activation_func`` say, transformers' ``KimiLinearTopkRouter`` hard-codes the same; groups
    ``num_expert_group`` (``n_group``) keeping ``topk_group``, renormalised when ``moe_renormalize``
    (``norm_topk_prob``), scaled by ``routed_scaling_factor``; ``num_shared_experts`` MLPs of ``moe_intermediate_size``.

    MoE layers: SGLang's rule, ``first_k_dense_replace <= i`` and ``i % moe_layer_freq == 0`` (SGLang's config
    defaults: 0 and 1); a transformers config's ``mlp_layer_types`` (what its model builds) when there is no
    ``first_k_dense_replace``; a config holding both that disagree is refused (the engines would differ).

    Kimi K3's text model is a ``kimi_linear`` config too; SGLang builds ``KimiK3MoE`` for it (by architecture), whose
    routing may bypass ``select_experts``: such a config (a ``KimiK3*`` architecture, or latent MoE:
    ``routed_expert_hidden_size``) is refused as Kimi K3."""
    archs = f.cfg.get("architectures")
    if (isinstance(archs, list) and any(isinstance(a, str) and a.startswith("KimiK3") for a in archs)) \
            or f.cfg.get("routed_expert_hidden_size") is not None:
        _unsupported_fields(f, "kimi_k3", n_layers)
    inter = f.integer("moe_intermediate_size", hi=1 << 24)
    n_shared = f.integer("num_shared_experts", "n_shared_experts", default=0, lo=0, hi=1 << 16)
    first_dense = f.integer("first_k_dense_replace", default=0, lo=0, hi=100_000)
    freq = f.integer("moe_layer_freq", default=1, hi=100_000)
    moe_layers = tuple(i for i in range(n_layers) if i >= first_dense and i % freq == 0)
    kinds = f.cfg.get("mlp_layer_types")
    if isinstance(kinds, list) and len(kinds) == n_layers and all(k in ("dense", "sparse") for k in kinds):
        typed = tuple(i for i, k in enumerate(kinds) if k == "sparse")
        if f.cfg.get("first_k_dense_replace") is None:
            moe_layers = typed
        elif typed != moe_layers:
            f.problems.append(f"mlp_layer_types makes layers {list(typed)} MoE (transformers' rule) but "
                              f"first_k_dense_replace / moe_layer_freq make {list(moe_layers)} MoE (SGLang's rule)")
    renorm = f.flag("moe_renormalize", f.flag("norm_topk_prob", True))
    return dict(moe_layers=moe_layers, moe_intermediate_size=inter, num_shared_experts=n_shared,
                shared_expert_intermediate_size=n_shared * inter, scoring_func="sigmoid", norm_topk_prob=renorm,
                n_group=f.integer("num_expert_group", "n_group", default=1, hi=1 << 16),
                topk_group=f.integer("topk_group", default=1, hi=1 << 16),
                routed_scaling_factor=f.number("routed_scaling_factor", 1.0), has_correction_bias=True)


def _gemma4_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """Gemma 4 (MoE): with ``enable_moe_block`` every decoder layer routes ``top_k_experts`` of ``num_experts``
    experts (``moe_intermediate_size``) beside its dense MLP (``intermediate_size``, run for every token: counted as
    one shared expert); softmax, always renormalised (no epsilon in transformers), then the learned per-expert scale
    (``has_expert_scale``). Without ``enable_moe_block`` (Gemma 4's dense models) there is no MoE layer."""
    moe = f.flag("enable_moe_block", False)
    dense = f.integer("intermediate_size", default=0, lo=0, hi=1 << 24)
    return dict(moe_layers=tuple(range(n_layers)) if moe else (),
                moe_intermediate_size=f.integer("moe_intermediate_size", hi=1 << 24),
                num_shared_experts=1 if dense else 0, shared_expert_intermediate_size=dense, scoring_func="softmax",
                norm_topk_prob=True, has_expert_scale=True)


def _deepseek_v4_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """DeepSeek-V4: every decoder layer is an MoE layer; the first ``num_hash_layers`` take their experts from a frozen
    token-id table (SGLang's ``HashTopK``, which never calls ``select_experts``; transformers'
    ``DeepseekV4HashRouter``): no policy can re-rank them, so they are *not* in ``moe_layers`` (every tool -- check,
    explain, replay, both engines -- then leaves them stock, as it leaves dense layers). The other layers select with
    ``sqrt(softplus(logits)) + e_score_correction_bias`` (``scoring_func``), ungrouped whatever ``n_group`` says
    (SGLang: ``TopK(use_grouped_topk=False)``; transformers: ``DeepseekV4TopKRouter``), weigh by the unbiased scores,
    renormalised (sum + 1e-20), times ``routed_scaling_factor``; ``n_shared_experts`` MLPs of ``moe_intermediate_size``.

    The hash layers: SGLang 0.5.23 reads ``num_hash_layers`` (0 when absent), transformers 5.19 reads
    ``mlp_layer_types`` (``hash_moe`` entries; built from ``num_hash_layers``, 3 when absent). A config naming neither,
    or both in disagreement, is refused (the engines would route different layers by hash). Refused as well: a
    ``norm_topk_prob`` of false (transformers always renormalises, SGLang follows the flag), a ``topk_method`` other
    than ``noaux_tc`` (SGLang then builds no correction bias, transformers always adds its own), a ``scoring_func``
    other than sqrtsoftplus or sigmoid."""
    n_hash = f.integer("num_hash_layers", default=0, lo=0, hi=100_000)
    kinds = f.cfg.get("mlp_layer_types")
    typed = None
    if kinds is not None:
        if not (isinstance(kinds, list) and len(kinds) == n_layers and all(k in ("hash_moe", "moe") for k in kinds)):
            f.problems.append(f"mlp_layer_types must list hash_moe or moe for each of the {n_layers} layers, not "
                              f"{describe(kinds)}")
        else:
            typed = tuple(i for i, k in enumerate(kinds) if k == "hash_moe")
    hash_layers = tuple(range(min(n_hash, n_layers)))
    if typed is not None and f.cfg.get("num_hash_layers") is None:
        hash_layers = typed
    elif typed is not None and typed != hash_layers:
        f.problems.append(f"mlp_layer_types hashes layers {list(typed)} (transformers' rule) but num_hash_layers "
                          f"hashes {list(hash_layers)} (SGLang's rule)")
    elif typed is None and kinds is None and f.cfg.get("num_hash_layers") is None:
        f.problems.append("num_hash_layers (or mlp_layer_types) is missing: SGLang 0.5.23 then routes no layer by "
                          "hash, transformers 5.19 the first 3")
    scoring = f.text("scoring_func", "sqrtsoftplus")
    if scoring not in ("sqrtsoftplus", "sigmoid"):
        f.problems.append(f"scoring_func {scoring!r}: sgl_budget reads DeepSeek-V4 configs scoring with sqrtsoftplus "
                          "(or sigmoid)")
    if not f.flag("norm_topk_prob", True):
        f.problems.append("norm_topk_prob false: transformers 5.19 always renormalises DeepSeek-V4's weights, "
                          "SGLang 0.5.23 does not")
    if f.text("topk_method", "noaux_tc") != "noaux_tc":
        f.problems.append("topk_method other than noaux_tc: SGLang 0.5.23 then builds no correction bias, "
                          "transformers 5.19 always adds one")
    inter = f.integer("moe_intermediate_size", hi=1 << 24)
    n_shared = f.integer("n_shared_experts", default=0, lo=0, hi=1 << 16)
    return dict(moe_layers=tuple(i for i in range(n_layers) if i not in hash_layers), moe_intermediate_size=inter,
                num_shared_experts=n_shared, shared_expert_intermediate_size=n_shared * inter,
                scoring_func=scoring if scoring in ("sqrtsoftplus", "sigmoid") else "sqrtsoftplus",
                norm_topk_prob=True, routed_scaling_factor=f.number("routed_scaling_factor", 1.5),
                has_correction_bias=True)


def _bailing_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """Ling / Bailing-MoE (``bailing_moe``), as SGLang 0.5.23's ``BailingMoESparseMoeBlock`` reads its config: MoE
    layers ``first_k_dense_replace <= i``; ``num_experts`` routed experts of ``moe_intermediate_size``;
    ``num_shared_experts`` shared MLPs of ``moe_shared_expert_intermediate_size`` (else ``moe_intermediate_size``);
    a correction bias (``gate.expert_bias``) with ``moe_router_enable_expert_bias``; scoring ``score_function``, else
    sigmoid with the bias and softmax without (SGLang asserts those pairs); grouped top-k when ``n_group`` or
    ``topk_group`` is set; renormalised with ``norm_topk_prob``; ``routed_scaling_factor``. Multimodal routers
    (``multi_gate``, ``router_type: MultiRouter``: per-modality gates and biases) are refused."""
    first_dense = f.integer("first_k_dense_replace", default=0, lo=0, hi=100_000)
    inter = f.integer("moe_intermediate_size", hi=1 << 24)
    n_shared = f.integer("num_shared_experts", default=0, lo=0, hi=1 << 16) \
        if f.cfg.get("num_shared_experts") is not None else 0
    shared_inter = f.integer("moe_shared_expert_intermediate_size", default=inter, hi=1 << 24) \
        if f.cfg.get("moe_shared_expert_intermediate_size") is not None else inter
    bias = f.flag("moe_router_enable_expert_bias", False)
    scoring = f.text("score_function", "sigmoid" if bias else "softmax")
    if f.cfg.get("score_function") is not None and (scoring == "sigmoid") != bias:
        f.problems.append(f"score_function {scoring!r} with moe_router_enable_expert_bias {bias} (SGLang accepts "
                          "softmax without a bias or sigmoid with one)")
    if f.flag("multi_gate", False) or f.text("router_type", "topN") == "MultiRouter":
        f.problems.append("multimodal routing (multi_gate / router_type MultiRouter: per-modality gates) is not "
                          "supported")
    n_group = f.integer("n_group", default=0, lo=0, hi=1 << 16)
    topk_group = f.integer("topk_group", default=0, lo=0, hi=1 << 16)
    if (n_group or topk_group) and not (n_group > 0 and 0 < topk_group <= n_group):
        f.problems.append(f"n_group {n_group} / topk_group {topk_group}: SGLang needs 0 < topk_group <= n_group")
    return dict(moe_layers=tuple(range(first_dense, n_layers)), moe_intermediate_size=inter,
                num_shared_experts=n_shared, shared_expert_intermediate_size=n_shared * shared_inter,
                scoring_func=scoring, norm_topk_prob=f.flag("norm_topk_prob", True), n_group=max(n_group, 1),
                topk_group=max(topk_group, 1), routed_scaling_factor=f.number("routed_scaling_factor", 1.0),
                has_correction_bias=bias)


def _unsupported_fields(f: _Fields, mt: str, n_layers: int) -> dict[str, Any]:
    """A known family whose config sgl_budget cannot describe: its engines' refusal, as a SpecError."""
    from .families import family_of, sglang_refusal

    fam = family_of(mt)
    raise SpecError(sglang_refusal(mt) if fam is not None and fam.sglang_refusal
                    else f"model type {mt!r}: sgl_budget cannot read this family's config yet")


# families.Family.config -> the reader of that family's config.json fields
_READERS: dict[str, Callable[[_Fields, str, int], dict[str, Any]]] = {
    "qwen": _qwen_fields, "deepseek": _deepseek_fields, "all_layers": _all_layers_fields,
    "qwen_renorm": lambda f, mt, n: _qwen_fields(f, mt, n, norm_default=True),
    "qwen_always_renorm": lambda f, mt, n: _qwen_fields(f, mt, n, always_renorm=True),
    "glm4": _glm4_fields, "minimax_m2": _minimax_m2_fields, "hunyuan": _hunyuan_fields, "ernie": _ernie_fields,
    "kimi_linear": _kimi_linear_fields, "gemma4": _gemma4_fields, "deepseek_v4": _deepseek_v4_fields,
    "bailing": _bailing_fields, "unsupported": _unsupported_fields,
}

# Model types outside families.FAMILIES whose configs still read as a spec (replay, explain), by shape.
_UNKNOWN_FAMILY_READERS = {"minimax": "all_layers", "phimoe": "all_layers"}

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
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a file name over 255 bytes
        raise SpecError(f"{str(ref)[:80]!r}: cannot use it as a model spec ({e.strerror or e})") from None
    if exists:
        return ModelSpec.from_hf_config(path)
    raise SpecError(
        f"unknown model spec {str(ref)!r}: not a preset ({', '.join(PRESETS)}) and no such config.json or model directory"
    )
