"""Recorded router logits: the trace format, batching for replay, and a labelled synthetic generator."""

from .batching import Batch, decode_batches, decode_index, prefill_batches, stack_decode_batches
from .format import FORMAT, Trace, TraceError, load_trace, write_trace
from .synthetic import synthetic_trace

__all__ = ["FORMAT", "Batch", "Trace", "TraceError", "decode_batches", "decode_index", "load_trace",
           "prefill_batches", "stack_decode_batches", "synthetic_trace", "write_trace"]
