"""Recorded router logits: one safetensors file per trace, JSON metadata inside (docs/formats.md).

Tensors: ``layer.{i}.router_logits`` ``[N, E]`` (fp16/bf16/fp32) per MoE layer i
(the model's real layer index); ``layer.{i}.correction_bias`` ``[E]`` fp32 iff the
model selects with sigmoid + bias; ``phase`` uint8 ``[N]`` (0 prefill, 1 decode);
optional ``token_ids`` int64 ``[N]``. Metadata entry ``sgl_budget.trace``: JSON
with ``format`` = ``sgl-budget-trace/1``, ``model_spec``, ``layers``,
``sequences`` (contiguous token ranges covering 0..N), ``source``, ``synthetic``
and ``created``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from ..datacheck import describe, is_int, missing_file, parse_json
from ..safetensors_meta import read_with_meta, save_with_meta
from ..spec import ModelSpec, SpecError

FORMAT = "sgl-budget-trace/1"
META_KEY = "sgl_budget.trace"
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PREFILL, DECODE = 0, 1


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file."""


@dataclass
class Trace:
    """Router logits of N tokens for every MoE layer, with what is needed to replay them."""

    spec: ModelSpec
    router_logits: dict[int, Tensor]  # layer -> [N, E]
    phase: Tensor  # [N] uint8, 0 = prefill, 1 = decode
    sequences: list[tuple[int, int]]  # contiguous [start, end) token ranges
    correction_bias: dict[int, Tensor] | None = None  # layer -> [E] float32
    token_ids: Tensor | None = None
    source: str = ""
    synthetic: bool = False
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def num_tokens(self) -> int:
        return int(self.phase.shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.router_logits))

    def validate(self, where: str = "trace") -> None:
        """Raise :class:`TraceError` unless shapes, dtypes, layers, phases and sequences agree."""
        _validate(self, where)


def _validate(t: Trace, where: str) -> None:
    def bad(msg: str) -> TraceError:
        return TraceError(f"{where}: {msg}")

    spec = t.spec
    if not t.router_logits:
        raise bad("no router logits (no layer.{i}.router_logits tensors)")
    extra = [l for l in t.router_logits if not spec.is_moe_layer(l)]
    if extra:
        raise bad(f"layers {extra} are not MoE layers of {spec.name} (its MoE layers: {list(spec.moe_layers)})")
    missing = [l for l in spec.moe_layers if l not in t.router_logits]
    if missing:
        raise bad(f"no router logits for MoE layers {missing[:8]}{'...' if len(missing) > 8 else ''} of "
                  f"{spec.name} (a trace covers every MoE layer)")
    n = t.num_tokens
    for l, x in t.router_logits.items():
        if x.dim() != 2 or x.shape[1] != spec.num_experts:
            raise bad(f"layer.{l}.router_logits has shape {list(x.shape)}, expected [N, {spec.num_experts}]")
        if x.shape[0] != n:
            raise bad(f"layer.{l}.router_logits has {x.shape[0]} tokens but phase has {n}")
        if x.dtype not in LOGIT_DTYPES:
            raise bad(f"layer.{l}.router_logits has dtype {x.dtype}; use float16, bfloat16 or float32")
        if not torch.isfinite(x).all():
            raise bad(f"layer.{l}.router_logits holds NaN or infinite values")
    if t.phase.dim() != 1 or t.phase.dtype != torch.uint8:
        raise bad(f"phase must be a 1-D uint8 tensor, not {t.phase.dtype} {list(t.phase.shape)}")
    if n and int(t.phase.max()) > DECODE:
        raise bad("phase values must be 0 (prefill) or 1 (decode)")
    if t.token_ids is not None and (tuple(t.token_ids.shape) != (n,) or t.token_ids.dtype != torch.int64):
        raise bad(f"token_ids must be an int64 [{n}] tensor, not {t.token_ids.dtype} {list(t.token_ids.shape)}")
    pos = 0
    for s in t.sequences:
        if len(s) != 2 or s[0] != pos or s[1] <= s[0]:
            raise bad(f"sequences must be non-empty contiguous ranges starting at 0; got {list(s)} at token {pos}")
        pos = s[1]
    if pos != n:
        raise bad(f"sequences cover {pos} tokens, the trace has {n}")
    if spec.has_correction_bias:
        if not t.correction_bias or set(t.correction_bias) != set(t.router_logits):
            raise bad(f"{spec.name} selects experts with a correction bias: every layer needs layer.{{i}}.correction_bias")
    elif t.correction_bias:
        raise bad(f"{spec.name} has no correction bias, but the trace holds some")
    for l, b in (t.correction_bias or {}).items():
        if tuple(b.shape) != (spec.num_experts,) or b.dtype != torch.float32 or not torch.isfinite(b).all():
            raise bad(f"layer.{l}.correction_bias must be a finite float32 [{spec.num_experts}] tensor, "
                      f"not {b.dtype} {list(b.shape)}")


def _meta_problems(meta: dict) -> list[str]:
    """Type problems of the metadata fields: integer layers, [start, end] integer pairs, string texts, a bool."""
    problems = []
    layers, seqs = meta["layers"], meta["sequences"]
    if not isinstance(layers, list) or not all(is_int(l) for l in layers):
        bad = next((l for l in layers if not is_int(l)), None) if isinstance(layers, list) else layers
        problems.append(f"'layers' must be a list of integer layer indices, not one holding {describe(bad)}")
    if not isinstance(seqs, list) or not all(isinstance(s, list) and len(s) == 2 and all(map(is_int, s))
                                             for s in seqs):
        problems.append("'sequences' must be [start, end] pairs of integers")
    for key in ("source", "created"):
        if not isinstance(meta.get(key, ""), str):
            problems.append(f"'{key}' must be a string, not {describe(meta[key])}")
    if not isinstance(meta.get("synthetic", False), bool):
        problems.append(f"'synthetic' must be true or false, not {describe(meta['synthetic'])}")
    return problems


def write_trace(trace: Trace, path: str | Path, dtype: torch.dtype | str = torch.float16) -> Path:
    """Validate and write ``trace``; logits are stored as ``dtype`` (fp16 by default)."""
    if isinstance(dtype, str):
        dtype = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}.get(dtype, dtype)
    if dtype not in LOGIT_DTYPES:
        raise TraceError(f"{path}: cannot store router logits as {dtype}; use float16, bfloat16 or float32")
    if trace.correction_bias:
        trace = replace(trace, correction_bias={l: b.float() for l, b in trace.correction_bias.items()})
    if trace.token_ids is not None:
        trace = replace(trace, token_ids=trace.token_ids.to(torch.int64))
    trace.validate(str(path))
    tensors = {f"layer.{l}.router_logits": x.to(dtype).contiguous() for l, x in trace.router_logits.items()}
    for l, b in (trace.correction_bias or {}).items():
        tensors[f"layer.{l}.correction_bias"] = b.float().contiguous().clone()  # layers may share one tensor
    tensors["phase"] = trace.phase.contiguous()
    if trace.token_ids is not None:
        tensors["token_ids"] = trace.token_ids.to(torch.int64).contiguous()
    meta = {"format": FORMAT, "model_spec": trace.spec.to_dict(), "layers": list(trace.layers),
            "sequences": [list(s) for s in trace.sequences], "source": trace.source,
            "synthetic": bool(trace.synthetic), "created": trace.created}
    return save_with_meta(tensors, path, META_KEY, meta)


def load_trace(path: str | Path) -> Trace:
    """Load and validate a trace; every problem is a :class:`TraceError` naming the file."""
    p = Path(path)
    why = missing_file(p)
    if why:
        raise TraceError(f"{p}: {'no such trace file' if why == 'no such file' else why}")
    try:
        tensors, meta_raw = read_with_meta(p, META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise TraceError(f"{p}: not a safetensors file ({e})") from None
    if meta_raw is None:
        raise TraceError(f"{p}: no '{META_KEY}' metadata; is this an sgl_budget trace?")
    try:
        meta = parse_json(meta_raw)
    except ValueError as e:
        why = str(e).removeprefix("not valid JSON: ")
        raise TraceError(f"{p}: metadata is not valid JSON ({why})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise TraceError(f"{p}: unsupported trace format {describe(got)}; expected {FORMAT!r}")
    for key in ("model_spec", "layers", "sequences"):
        if key not in meta:
            raise TraceError(f"{p}: metadata lacks '{key}'")
    problems = _meta_problems(meta)
    if problems:
        raise TraceError(f"{p}: metadata: " + "; ".join(problems))
    try:
        spec = ModelSpec.from_dict(meta["model_spec"])
    except SpecError as e:
        raise TraceError(f"{p}: bad model_spec in metadata: {e}") from None
    layers = [int(l) for l in meta["layers"]]
    sequences = [(int(a), int(b)) for a, b in meta["sequences"]]
    if len(set(layers)) != len(layers):
        raise TraceError(f"{p}: metadata lists a layer twice: {layers}")
    logits = {l: tensors.pop(f"layer.{l}.router_logits", None) for l in layers}
    missing = [l for l, x in logits.items() if x is None]
    if missing:
        raise TraceError(f"{p}: metadata lists layers {missing} but the file has no router logits for them")
    bias = {l: tensors.pop(f"layer.{l}.correction_bias") for l in layers if f"layer.{l}.correction_bias" in tensors}
    phase = tensors.pop("phase", None)
    if phase is None:
        raise TraceError(f"{p}: no 'phase' tensor")
    token_ids = tensors.pop("token_ids", None)
    if tensors:
        raise TraceError(f"{p}: unexpected tensors {sorted(tensors)[:5]} (layers not listed in the metadata?)")
    trace = Trace(spec=spec, router_logits=logits, phase=phase, sequences=sequences, correction_bias=bias or None,
                  token_ids=token_ids, source=meta.get("source", ""), synthetic=meta.get("synthetic", False),
                  created=meta.get("created", ""))
    trace.validate(str(p))
    return trace
