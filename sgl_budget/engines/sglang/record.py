"""Record router logits from a running SGLang worker into sgl_budget trace files (``--moe-record-trace DIR``).

Each forward's logits (non-padded rows only) are copied to the host per MoE layer.
That copy synchronises, so recording is for capturing traffic, not for serving at
full speed; decode steps replayed from CUDA graphs never reach Python and are not
recorded (disable CUDA graphs to record decode). A prefill forward's sequences are
its requests; a decode forward of B requests is stored as B one-token sequences,
so ``sgl-budget replay --batch-size B`` re-forms the recorded decode batches. Only
TP rank 0 records (every rank sees the same logits). Recording stops after
``max_tokens`` tokens. The trace file is rewritten with everything recorded so far
at most every ``WRITE_EVERY_S`` seconds of traffic, when ``max_tokens`` is reached and at
exit — so stopping the server (whose launcher SIGKILLs its workers, skipping ``atexit``)
loses at most the last few seconds.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...spec import ModelSpec
from ...traces import Trace, write_trace
from ...traces.format import DECODE, PREFILL
from .context import current_forward_batch

log = logging.getLogger("sgl_budget")
WRITE_EVERY_S = 2.0


@dataclass
class _Forward:
    phase: int
    seq_lens: list[int]
    logits: dict[int, Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(self.seq_lens)


class Recorder:
    """Buffers router logits per forward and writes them as one trace."""

    def __init__(self, directory: str | Path, spec: ModelSpec, max_tokens: int, rank0_only: bool = True) -> None:
        self.dir, self.spec, self.max_tokens = Path(directory), spec, int(max_tokens)
        self.done: list[_Forward] = []
        self.current: _Forward | None = None
        self.bias: dict[int, Tensor] = {}
        self.tokens = 0
        self.stopped = rank0_only and not _is_tp_rank0()
        self.path = self.dir / f"sglang-{os.getpid()}.trace.safetensors"
        self.written_at = time.monotonic()
        self.unwritten = False
        atexit.register(self.flush)

    def observe(self, layer_id: int | None, router_logits: Tensor, num_token_non_padded=None,
                correction_bias: Tensor | None = None) -> None:
        if self.stopped or layer_id is None or not self.spec.is_moe_layer(layer_id):
            return
        if self.current is not None and layer_id in self.current.logits:
            self._close_forward()
            if self.stopped:
                return
        n = router_logits.shape[0] if num_token_non_padded is None else int(num_token_non_padded)
        if self.current is None:
            self.current = self._new_forward(n)
        self.current.logits[layer_id] = router_logits[:n].detach().to("cpu", torch.float16)
        if correction_bias is not None and layer_id not in self.bias:
            # [E]; ERNIE's TopK holds [1, E] off CPU
            self.bias[layer_id] = correction_bias.detach().float().cpu().reshape(correction_bias.shape[-1]).clone()

    def _new_forward(self, n: int) -> _Forward:
        fb = current_forward_batch()
        if fb is not None and fb.forward_mode.is_decode():
            return _Forward(DECODE, [1] * n)
        lens = getattr(fb, "extend_seq_lens_cpu", None) if fb is not None else None
        lens = [int(x) for x in lens] if lens is not None and sum(int(x) for x in lens) == n else [n]
        return _Forward(PREFILL, lens)

    def _close_forward(self) -> None:
        fwd, self.current = self.current, None
        if fwd is None or fwd.tokens == 0:
            return
        self.done.append(fwd)
        self.tokens += fwd.tokens
        self.unwritten = True
        if self.tokens >= self.max_tokens:
            self.flush()
            self.stopped = True
            log.info("sgl_budget: recorded %d tokens to %s; recording stopped", self.tokens, self.path)
        elif time.monotonic() - self.written_at >= WRITE_EVERY_S:
            self.flush()

    def flush(self) -> Path | None:
        """(Re)write everything recorded so far as this worker's trace file; None when nothing was recorded."""
        if self.current is not None and not self.stopped:
            self._close_forward()
        if not self.done:
            return None
        if not self.unwritten:
            return self.path
        layers = sorted(set.intersection(*(set(f.logits) for f in self.done)))
        if not layers:
            return None
        logits = {l: torch.cat([f.logits[l] for f in self.done]) for l in layers}
        phase = torch.cat([torch.full((f.tokens,), f.phase, dtype=torch.uint8) for f in self.done])
        seqs, pos = [], 0
        for f in self.done:
            for n in f.seq_lens:
                seqs.append((pos, pos + n))
                pos += n
        bias = {l: self.bias[l] for l in layers} if self.spec.has_correction_bias else None
        trace = Trace(spec=self.spec, router_logits=logits, phase=phase, sequences=seqs, correction_bias=bias,
                      source=f"recorded from SGLang (pid {os.getpid()}), {len(self.done)} forwards", synthetic=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        write_trace(trace, tmp)
        os.replace(tmp, self.path)  # readers never see a half-written trace
        self.written_at, self.unwritten = time.monotonic(), False
        return self.path


def _is_tp_rank0() -> bool:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_rank) == 0
    except Exception:  # no parallel context (a unit test calling TopK directly): record
        return True
