"""Per-policy serving statistics: requests, tokens, mean experts per token actually routed.

Requests and tokens are counted on the host when a batch is built. Routed expert slots are
summed on the device inside the routing (an ``index_add_`` per MoE layer into cumulative
counters: no host sync, so it also runs inside captured CUDA graphs) and read back by a
reporting thread once per interval. Rank 0 of each tensor-parallel group reports: a log line per interval when anything
changed, and — with ``--enable-metrics`` — Prometheus series in SGLang's style:

* ``sglang:moe_policy_requests_total{policy}``
* ``sglang:moe_policy_prompt_tokens_total{policy}``, ``sglang:moe_policy_generation_tokens_total{policy}``
* ``sglang:moe_policy_routed_experts_total{policy}`` (expert slots, summed over MoE layers) and
  ``sglang:moe_policy_routed_token_layers_total{policy}`` (tokens x MoE layers routed)
* ``sglang:moe_policy_experts_per_token{policy}`` (gauge: the ratio of the two, since start)
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch import Tensor

from ...lang.policy_set import PolicySet

log = logging.getLogger("sgl_budget")
METRIC_PREFIX = "sglang:moe_policy_"


class PolicyStats:
    """Counters of one worker, by policy id."""

    def __init__(self, pset: PolicySet, interval: float, report: bool = True) -> None:
        self.pset, self.interval, self.report = pset, interval, report
        p = len(pset)
        self.requests = [0] * p
        self.prompt_tokens = [0] * p
        self.generation_tokens = [0] * p
        self.slots = [0] * p  # routed expert slots (summed over MoE layers)
        self.token_layers = [0] * p  # tokens x MoE layers routed
        # cumulative [2, P] device counters, never replaced: a captured CUDA graph keeps adding to the same tensor
        self._dev: Tensor | None = None
        self._dev_seen = [0] * (2 * p)  # their values at the last read
        self._host = [0] * (2 * p)  # layers SGLang's own top-k routed (counted on the host, no device work)
        self._lock = threading.Lock()
        self._logged: tuple | None = None
        self._metrics = None
        self._exported = [(0, 0, 0, 0, 0)] * p
        self._started = False  # a real batch was seen (the reporting thread runs from then on)

    # -- counting -----------------------------------------------------------------------------
    def on_batch(self, per_req: list[int], decoding: list[bool], lens: list[int], reqs) -> None:
        """Host side, once per forward batch: new requests and the tokens each policy's rows forward."""
        if not self._started:  # the first real batch: warm-up and graph-capture forwards before it do not count
            self._started = True
            with self._lock:
                self._collect()
                self.slots = [0] * len(self.pset)
                self.token_layers = [0] * len(self.pset)
            if self.report:
                threading.Thread(target=self._loop, name="sgl_budget-stats", daemon=True).start()
        with self._lock:
            for p, dec, n, r in zip(per_req, decoding, lens, reqs):
                if dec:
                    self.generation_tokens[p] += n
                    continue
                if not getattr(r, "_sgl_budget_counted", False):
                    r._sgl_budget_counted = True
                    self.requests[p] += 1
                self.prompt_tokens[p] += n

    def add_routed(self, slots: Tensor, tokens: Tensor) -> None:
        """Device side, once per routed layer: ``[P]`` slots and tokens (no sync)."""
        dev = self._device(slots.device)
        dev[0].add_(slots)
        dev[1].add_(tokens)

    def _device(self, device: torch.device) -> Tensor:
        if self._dev is None or self._dev.device != device:
            self._dev = torch.zeros(2, len(self.pset), dtype=torch.int64, device=device)
            self._dev_seen = [0] * (2 * len(self.pset))
        return self._dev

    def add_uniform(self, policy: int, slots: Tensor, num_tokens: int) -> None:
        """A layer whose rows all use ``policy``: its routed slot count (a device scalar) and token count."""
        self._device(slots.device)[0, policy].add_(slots)
        with self._lock:
            self._host[len(self.pset) + policy] += num_tokens

    def add_stock(self, policy: int, num_tokens: int, top_k: int) -> None:
        """A layer SGLang's own top-k routed for rows all of one policy (known on the host)."""
        with self._lock:
            self._host[policy] += num_tokens * top_k
            self._host[len(self.pset) + policy] += num_tokens

    # -- reporting ----------------------------------------------------------------------------
    def experts_per_token(self, p: int) -> float | None:
        return self.slots[p] / self.token_layers[p] if self.token_layers[p] else None

    def _collect(self) -> None:
        """Fold new device and host routing counts into the totals (one device read; caller holds the lock)."""
        p = len(self.pset)
        now = self._dev.flatten().tolist() if self._dev is not None else self._dev_seen
        delta = [int(a) - int(b) + h for a, b, h in zip(now, self._dev_seen, self._host)]
        self._dev_seen, self._host = list(now), [0] * (2 * p)
        for i in range(p):
            self.slots[i] += delta[i]
            self.token_layers[i] += delta[p + i]

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.report_now()
            except Exception:  # statistics must never take the server down
                log.exception("sgl_budget: policy statistics failed")

    def report_now(self) -> None:
        """Collect, then log (when anything changed) and export to Prometheus."""
        with self._lock:
            self._collect()
            state = (tuple(self.requests), tuple(self.prompt_tokens), tuple(self.generation_tokens),
                     tuple(self.slots))
            changed = state != self._logged
            self._logged = state
            summary = self.summary()
        if changed:
            log.info("sgl_budget: MoE policies since start: %s", summary)
        self._export()

    def summary(self) -> str:
        parts = []
        for p, name in enumerate(self.pset.names):
            ept = self.experts_per_token(p)
            parts.append(f"{name}: {self.requests[p]} requests, {self.prompt_tokens[p] + self.generation_tokens[p]} "
                         f"tokens (prompt {self.prompt_tokens[p]}, generated {self.generation_tokens[p]}), "
                         f"{'-' if ept is None else f'{ept:.3f}'} experts/token")
        return "; ".join(parts)

    def snapshot(self) -> dict[str, dict]:
        return {name: {"requests": self.requests[p], "prompt_tokens": self.prompt_tokens[p],
                       "generation_tokens": self.generation_tokens[p], "experts_per_token": self.experts_per_token(p)}
                for p, name in enumerate(self.pset.names)}

    def _export(self) -> None:
        metrics = self._prometheus()
        if metrics is None:
            return
        for p, name in enumerate(self.pset.names):
            now = (self.requests[p], self.prompt_tokens[p], self.generation_tokens[p], self.slots[p],
                   self.token_layers[p])
            before = self._exported[p]
            for counter, new, old in zip(metrics[:5], now, before):
                if new > old:
                    counter.labels(**self._labels(name)).inc(new - old)
            self._exported[p] = now
            ept = self.experts_per_token(p)
            if ept is not None:
                metrics[5].labels(**self._labels(name)).set(ept)

    def _labels(self, name: str) -> dict[str, str]:
        return {"model_name": self._model_name, "policy": name}

    def _prometheus(self):
        if self._metrics is not None:
            return self._metrics or None
        self._metrics = ()
        try:
            from sglang.srt.runtime_context import get_server_args

            args = get_server_args()
        except Exception:  # no server args: not inside a server (tests)
            return None
        if not getattr(args, "enable_metrics", False):
            return None
        try:
            from prometheus_client import Counter, Gauge
        except ImportError:
            log.warning("sgl_budget: --enable-metrics without prometheus_client: no per-policy metrics")
            return None
        self._model_name = str(getattr(args, "served_model_name", None) or args.model_path)
        labels = ["model_name", "policy"]
        c = [Counter(METRIC_PREFIX + n, doc, labelnames=labels) for n, doc in (
            ("requests_total", "Requests served, by MoE policy."),
            ("prompt_tokens_total", "Prompt (prefill) tokens computed, by MoE policy."),
            ("generation_tokens_total", "Generated (decode) tokens, by MoE policy."),
            ("routed_experts_total", "Routed expert slots, summed over MoE layers, by MoE policy."),
            ("routed_token_layers_total", "Tokens routed times MoE layers, by MoE policy."))]
        g = Gauge(METRIC_PREFIX + "experts_per_token", "Mean routed experts per token and MoE layer since start, "
                  "by MoE policy.", labelnames=labels, multiprocess_mode="mostrecent")
        self._metrics = (*c, g)
        log.info("sgl_budget: per-policy metrics exported as %s*", METRIC_PREFIX)
        return self._metrics
