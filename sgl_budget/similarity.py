"""Expert-similarity files (safetensors) read by a policy's ``reroute`` block (SERE).

Tensors: ``layer.{i}.similarity`` float32 ``[E, E]`` per MoE layer i (real layer
index) — how well expert p can stand in for expert e, in [0, 1], diagonal 1 —
and optionally ``layer.{i}.critical`` int64 ``[E]``, the experts ranked most
critical first. Metadata entry ``sgl_budget.similarity`` (JSON):
``{"format": "sgl-budget-similarity/1", "model": {name, num_experts, moe_layers},
"method": ..., "source": ..., "synthetic": bool}``.

Without a stored ranking, critical experts are those least replaceable: sorted by
their highest similarity to any other expert, ascending (ties by index).

:func:`load_similarity` checks, with one message per problem: the file exists and is
safetensors; the metadata entry is present, JSON, of this format, and gives
``num_experts`` and a non-empty, duplicate-free ``moe_layers``; every listed layer
has a ``[E, E]`` matrix that is finite, within [0, 1] (tolerance 1e-5) and has a
diagonal of 1 (tolerance 1e-4); a stored ``critical`` is an integer permutation of
0..E-1; and no tensor belongs to a layer the metadata does not list.
:func:`synthetic_similarity` makes a SYNTHETIC seeded table (``"synthetic": true``)
for tests and demos; it says nothing about a real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from .datacheck import describe, is_int, missing_file, parse_json
from .safetensors_meta import read_with_meta, save_with_meta
from .spec import ModelSpec

FORMAT = "sgl-budget-similarity/1"
META_KEY = "sgl_budget.similarity"
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class SimilarityFileError(ValueError):
    """A similarity file that cannot be used."""

    def __init__(self, message: str, path: str | Path, hint: str | None = None) -> None:
        self.message, self.path, self.hint = message, str(path), hint
        super().__init__(f"{path}: {message}" + (f" (hint: {hint})" if hint else ""))


METHODS = ("frobenius", "cosine", "cka")  # SERE's similarity metrics (``sgl-budget similarity --method``)
STORED_BYTES = 4 << 30  # cka keeps every expert's outputs: at most this much per layer and session


def glu_expert_outputs(h: Tensor, gate_up: Tensor, down: Tensor, act) -> Tensor:
    """``[E, N, H]``: every gated expert applied to every token of ``h [N, H]`` (``gate_up [E, 2I, H]``, gate
    rows first; ``down [E, H, I]``; ``act`` the gate's activation). Both engines' expert math (a tensor-parallel
    shard of I gives a partial sum of the output)."""
    gate_up = torch.einsum("nh,eih->eni", h, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.einsum("eni,ehi->enh", act(gate) * up, down)


def sample_tokens(num_tokens: int, layers, tokens: int, seed: int = 0) -> dict[int, Tensor]:
    """The calibration tokens each layer's similarity is measured on: indices into all ``num_tokens`` tokens in
    window order (window-major), ``tokens`` per layer drawn layer after layer (in the order given) from one
    generator seeded ``seed``. The transformers path and ``--server`` draw the same ones."""
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randperm(num_tokens, generator=g)[:tokens] for l in layers}


def frobenius_similarity(dist: Tensor) -> Tensor:
    """SERE's ``frobenius``: ``1 - ||O_a - O_b||_F / max pair distance`` from the ``[E, E]`` distances."""
    return 1 - dist / dist.max().clamp_min(1e-12)


def cosine_similarity(mean_cos: Tensor) -> Tensor:
    """SERE's ``cosine``: the mean per-token cosine of two experts' outputs mapped to [0, 1]."""
    return (mean_cos + 1) / 2


def cka_similarity(cross: Tensor) -> Tensor:
    """Linear CKA from ``cross[a, b] = ||X_a^T X_b||_F^2`` of the token-centred outputs."""
    norms = cross.diagonal().sqrt()
    return cross / (norms[:, None] * norms[None, :]).clamp_min(1e-12)


def unit_diagonal(sim: Tensor) -> Tensor:
    sim = sim.clamp(0, 1)
    sim.fill_diagonal_(1.0)
    return sim


def similarity_matrix(outs: Tensor, method: str) -> Tensor:
    """``[E, E]`` in [0, 1] with unit diagonal from expert outputs ``[E, N, H]`` (the transformers path: all
    outputs at once)."""
    e = outs.shape[0]
    if method == "frobenius":
        flat = outs.reshape(e, -1)
        sim = frobenius_similarity(torch.cdist(flat, flat))
    elif method == "cosine":
        unit = torch.nn.functional.normalize(outs, dim=-1)
        sim = cosine_similarity(torch.einsum("anh,bnh->abn", unit, unit).mean(-1))
    elif method == "cka":
        xc = outs - outs.mean(dim=1, keepdim=True)
        # ||X_a^T X_b||_F^2 one row at a time ([E, H, H] per row keeps memory bounded)
        cross = torch.stack([torch.einsum("nh,bnk->bhk", xc[a], xc).pow(2).sum((-1, -2)) for a in range(e)])
        sim = cka_similarity(cross)
    else:
        raise ValueError(f"method must be one of {METHODS}")
    return unit_diagonal(sim)


class SimilarityStats:
    """One layer's similarity accumulated from expert outputs that arrive a few tokens at a time (the SGLang
    workers' path): the same matrix as :func:`similarity_matrix` of all the outputs at once, up to rounding.

    ``frobenius`` keeps the Gram matrix of the flattened outputs (float64; squared distances are
    ``G_aa + G_bb - 2 G_ab``), ``cosine`` the sum over tokens of every pair's cosine (float64). Linear CKA
    centres every expert's outputs over all tokens and compares ``H x H`` cross-covariances, which no small
    statistic gives: ``cka`` keeps the outputs themselves (at most :data:`STORED_BYTES`) and computes
    :func:`similarity_matrix` at the end.
    """

    def __init__(self, method: str, max_stored_bytes: int = STORED_BYTES) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        self.method, self.max_stored_bytes = method, max_stored_bytes
        self.tokens = 0
        self.stat: Tensor | None = None
        self.kept: list[Tensor] = []
        self.stored = 0

    def add(self, outs: Tensor) -> None:
        """Outputs ``[E, n, H]`` of every expert on ``n`` more tokens."""
        e = outs.shape[0]
        if self.method == "cka":
            self.stored += outs.numel() * 4
            if self.stored > self.max_stored_bytes:
                raise ValueError(f"--method cka keeps every expert's outputs (experts x tokens x hidden floats): "
                                 f"over {self.max_stored_bytes / 2**30:.1f} GiB per layer here; use fewer --tokens, "
                                 "or frobenius / cosine (accumulated as they arrive)")
            self.kept.append(outs.float().cpu())
        elif self.method == "frobenius":
            flat = outs.reshape(e, -1).double()
            got = flat @ flat.T
            self.stat = got if self.stat is None else self.stat + got
        else:
            unit = torch.nn.functional.normalize(outs.float(), dim=-1).double()
            got = torch.einsum("anh,bnh->ab", unit, unit)
            self.stat = got if self.stat is None else self.stat + got
        self.tokens += outs.shape[1]

    def matrix(self) -> Tensor:
        """``[E, E]`` float32 in [0, 1], unit diagonal."""
        if self.tokens == 0:
            raise ValueError("no expert outputs were accumulated")
        if self.method == "cka":
            return similarity_matrix(torch.cat(self.kept, dim=1), "cka")
        stat = self.stat.cpu()
        if self.method == "frobenius":
            sq = stat.diagonal()
            dist = (sq[:, None] + sq[None, :] - 2 * stat).clamp_min(0).sqrt()
            dist.fill_diagonal_(0.0)
            sim = frobenius_similarity(dist)
        else:
            sim = cosine_similarity(stat / self.tokens)
        return unit_diagonal(sim.float())


def derive_critical(sim: Tensor) -> Tensor:
    """Experts ranked most critical first: ascending best similarity to any other expert (stable)."""
    off = sim.clone().float()
    off.fill_diagonal_(float("-inf"))
    best = off.max(dim=1).values
    return torch.sort(best, stable=True).indices.to(torch.int64)


@dataclass(frozen=True)
class SimilarityTable:
    """Per-layer similarity matrices and critical-expert rankings."""

    matrices: dict[int, Tensor]  # layer -> [E, E] float32
    critical: dict[int, Tensor]  # layer -> [E] int64, most critical first
    model: dict
    method: str = ""
    source: str = ""
    synthetic: bool = False
    path: str = ""

    @property
    def num_experts(self) -> int:
        return next(iter(self.matrices.values())).shape[0] if self.matrices else 0

    def check_against(self, spec: ModelSpec) -> list[str]:
        """Why this table cannot serve ``spec`` ([] when it can)."""
        problems = []
        if self.num_experts != spec.num_experts:
            problems.append(f"it has {self.num_experts} experts per layer, the model {spec.num_experts}")
        problems += spec.layer_coverage_problems(self.matrices)
        return problems


def save_similarity(table: SimilarityTable, path: str | Path) -> Path:
    tensors = {}
    for l, m in table.matrices.items():
        tensors[f"layer.{l}.similarity"] = m.float().contiguous()
        if l in table.critical:
            tensors[f"layer.{l}.critical"] = table.critical[l].to(torch.int64).contiguous()
    meta = {"format": FORMAT, "model": table.model, "method": table.method, "source": table.source,
            "synthetic": bool(table.synthetic)}
    return save_with_meta(tensors, path, META_KEY, meta)


def load_similarity(path: str | Path) -> SimilarityTable:
    """Load and validate a similarity file; problems raise :class:`SimilarityFileError`."""
    p = Path(path)
    why = missing_file(p)
    if why:
        raise SimilarityFileError(why, p)
    try:
        tensors, raw = read_with_meta(p, META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise SimilarityFileError(f"not a safetensors file ({e})", p) from None
    if raw is None:
        raise SimilarityFileError(f"no '{META_KEY}' metadata", p, "write it with `sgl-budget similarity`")
    try:
        meta = parse_json(raw)
    except ValueError as e:
        raise SimilarityFileError(f"metadata is not valid JSON ({e})", p) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise SimilarityFileError(f"unsupported format {describe(got)}; expected {FORMAT!r}", p)
    model = meta.get("model")
    if not isinstance(model, dict) or "num_experts" not in model or "moe_layers" not in model:
        raise SimilarityFileError("metadata 'model' must give num_experts and moe_layers", p)
    e, layers = model["num_experts"], model["moe_layers"]
    if not is_int(e) or not 1 <= e <= 1 << 16:
        raise SimilarityFileError(f"metadata num_experts must be a positive integer, not {describe(e)}", p)
    if (not isinstance(layers, list) or not layers
            or not all(is_int(l) and l >= 0 for l in layers)):
        raise SimilarityFileError(f"metadata moe_layers must be a non-empty list of layer indices, not "
                                  f"{describe(layers)}", p)
    if len(set(layers)) != len(layers):
        raise SimilarityFileError(f"metadata moe_layers lists a layer twice: {layers[:16]}", p)
    texts = [k for k in ("method", "source") if not isinstance(meta.get(k, ""), str)]
    if texts or not isinstance(meta.get("synthetic", False), bool):
        raise SimilarityFileError(f"metadata {', '.join(texts) or 'synthetic'} must be "
                                  f"{'a string' if texts else 'true or false'}", p)
    matrices, critical = {}, {}
    for l in layers:
        m = tensors.pop(f"layer.{l}.similarity", None)
        if m is None:
            raise SimilarityFileError(f"metadata lists layer {l} but there is no layer.{l}.similarity", p)
        if tuple(m.shape) != (e, e):
            why = "it is not square" if m.dim() != 2 or m.shape[0] != m.shape[1] else \
                f"metadata num_experts is {e}"
            raise SimilarityFileError(f"layer.{l}.similarity has shape {list(m.shape)}, expected [{e}, {e}] "
                                      f"({why})", p)
        if m.dtype == torch.bool or not (m.is_floating_point() or m.dtype in _INT_DTYPES):
            raise SimilarityFileError(f"layer.{l}.similarity has dtype {m.dtype}, expected float32", p)
        m = m.float()
        if not torch.isfinite(m).all():
            raise SimilarityFileError(f"layer.{l}.similarity holds NaN or infinite values", p)
        if float(m.min()) < -1e-5 or float(m.max()) > 1 + 1e-5:
            raise SimilarityFileError(f"layer.{l}.similarity has values outside [0, 1] "
                                      f"({float(m.min()):.4g}..{float(m.max()):.4g})", p,
                                      "map similarities into [0, 1] (e.g. (cos + 1) / 2)")
        if not torch.allclose(m.diagonal(), torch.ones(e), atol=1e-4):
            raise SimilarityFileError(f"layer.{l}.similarity must have 1 on its diagonal", p,
                                      "an expert is fully similar to itself")
        matrices[l] = m.clamp(0.0, 1.0)
        c = tensors.pop(f"layer.{l}.critical", None)
        if c is None:
            c = derive_critical(m)
        elif c.dtype not in _INT_DTYPES:
            raise SimilarityFileError(f"layer.{l}.critical has dtype {c.dtype}, expected int64", p)
        elif tuple(c.shape) != (e,) or not torch.equal(torch.sort(c.long()).values, torch.arange(e)):
            raise SimilarityFileError(f"layer.{l}.critical must be a permutation of 0..{e - 1} "
                                      f"(shape {list(c.shape)})", p, "rank every expert once, most critical first")
        critical[l] = c.long()
    if tensors:
        raise SimilarityFileError(f"unexpected tensors {sorted(tensors)[:5]} (layers missing from metadata?)", p)
    return SimilarityTable(matrices=matrices, critical=critical, model=model, method=meta.get("method", ""),
                           source=meta.get("source", ""), synthetic=meta.get("synthetic", False), path=str(p))


def synthetic_similarity(spec: ModelSpec, seed: int = 0, cluster: int = 4) -> SimilarityTable:
    """A SYNTHETIC, seeded table: experts in clusters of ``cluster`` resemble each other."""
    g = torch.Generator().manual_seed(seed)
    e = spec.num_experts
    matrices = {}
    for l in spec.moe_layers:
        centres = torch.randn((e + cluster - 1) // cluster, 16, generator=g)
        members = torch.randperm(e, generator=g) // cluster
        feats = centres[members] + 0.6 * torch.randn(e, 16, generator=g)
        feats = feats / feats.norm(dim=1, keepdim=True)
        m = ((feats @ feats.T + 1) / 2).clamp(0, 1)
        m = (m + m.T) / 2  # exactly symmetric whatever the matmul rounding
        m.fill_diagonal_(1.0)
        matrices[l] = m
    return SimilarityTable(
        matrices=matrices, critical={l: derive_critical(m) for l, m in matrices.items()},
        model={"name": spec.name, "num_experts": e, "moe_layers": list(spec.moe_layers)},
        method="synthetic-cosine", source=f"SYNTHETIC: clustered random expert features, seed={seed}",
        synthetic=True,
    )
