"""Per-request policy choice in SGLang: the request check, and each forward's row -> policy map.

A request picks a policy with ``custom_params: {"moe_policy": NAME}`` in its sampling
parameters — a field SGLang 0.5.23 carries from ``/generate``, the OpenAI-compatible
endpoints (``custom_params`` in the request body) and ``Engine.generate`` to every
worker's ``Req`` without any server option.

* In the process that tokenizes requests, :func:`check_request` runs after SGLang's own
  ``SamplingParams.verify``: an unknown name is a ``ValueError``, which SGLang answers with
  HTTP 400 and the message (listing the names); the request is never scheduled.
* In each scheduler worker, :func:`fill_rows` runs when SGLang builds a ``ForwardBatch`` (before
  the forward, eager or CUDA-graph replay): it writes the batch's token -> policy ids into one
  persistent device buffer (:class:`RowPolicies`) with a host-to-device copy on the current
  stream (as SGLang copies the batch's other inputs; with the overlap scheduler SGLang 0.5.23 builds
  the batch on its forward stream, so the copy is ordered after the previous forward's reads), and
  notes on the batch whether every row shares one policy (then only that policy routes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ...lang.policy_set import DEFAULT, REQUEST_KEY, PolicySet, UnknownPolicy, shown_name

log = logging.getLogger("sgl_budget")
ENV_PER_REQUEST_OFF = "SGLBUDGET_PER_REQUEST_OFF"  # why per-request choice is off in this launch, if it is
ROWS_ATTR = "_sgl_budget_rows"  # set on each ForwardBatch by fill_rows
CAPACITY = 16384  # rows of the persistent buffer (CUDA-graph batches are far smaller; larger prefills get their own)


def requested_name(custom_params) -> str | None:
    """The policy name a request asks for (None: no choice)."""
    if isinstance(custom_params, dict):
        return custom_params.get(REQUEST_KEY)
    return None


def check_request(custom_params, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for a request that names a policy this server does not serve."""
    name = requested_name(custom_params)
    if name is None:
        return
    off = os.environ.get(ENV_PER_REQUEST_OFF)
    if off and name != DEFAULT:
        raise ValueError(f"MoE policy {shown_name(name)} cannot be chosen per request in this launch: {off}")
    if not isinstance(name, str) or name not in names:
        raise UnknownPolicy.of(name, names)


def verify_hook(original, self, *args, **kwargs):
    """Around ``SamplingParams.verify``: SGLang's checks, then the policy name."""
    from .settings import request_names

    from .calibration import check_request as check_calibration

    result = original(self, *args, **kwargs)
    params = getattr(self, "custom_params", None)
    check_request(params, request_names())
    check_calibration(params, requested_name(params))
    return result


def cache_key(extra_key: str | None, custom_params, pset: PolicySet) -> str | None:
    """The request's prefix-cache scope: SGLang's ``extra_key`` plus its policy unless it is the default.

    KV computed under one policy is not what another policy computes for the same tokens (every layer
    after the first reads the routing of the layers before it), so the radix cache must never hand one
    policy's prefix to a request of another. SGLang scopes its radix tree by ``Req.extra_key`` (as it
    does for LoRA adapters); default-policy requests keep the plain key and share the cache as before.
    """
    from .calibration import calibration_scope

    scope = calibration_scope(custom_params)  # policy text / lock-step routing: never another request's KV
    if scope:
        extra_key = f"{extra_key or ''}\x1fsgl_budget.calibration={scope}"
    try:
        p = pset.index(requested_name(custom_params))
    except UnknownPolicy:
        return extra_key
    if p == pset.default:
        return extra_key
    return f"{extra_key or ''}\x1fsgl_budget.moe_policy={pset.names[p]}"


@dataclass
class BatchRows:
    """What :func:`fill_rows` learnt about one forward batch on the host."""

    num_rows: int  # tokens of the forward the map covers
    uniform: int | None  # the one policy id every row uses, or None for a mixed batch
    rows: Tensor | None = None  # the map itself when it did not fit the persistent buffer


class RowPolicies:
    """The persistent device buffer holding the running forward's token -> policy ids.

    One buffer, never reallocated, so a CUDA graph captured while reading ``buf[:T]`` reads the
    ids filled before each replay; padded rows past the real ones keep stale ids and are masked
    by SGLang's ``num_token_non_padded`` row mask.
    """

    def __init__(self, default: int) -> None:
        self.default = default
        self.buf: Tensor | None = None

    def buffer(self, device: torch.device) -> Tensor:
        if self.buf is None or self.buf.device != device:
            self.buf = torch.full((CAPACITY,), self.default, dtype=torch.int32, device=device)
        return self.buf

    def fill(self, ids: list[int], device: torch.device) -> BatchRows:
        n = len(ids)
        uniform = ids[0] if n and all(i == ids[0] for i in ids) else (self.default if not n else None)
        host = torch.tensor(ids, dtype=torch.int32)
        if n > CAPACITY:
            return BatchRows(n, uniform, host.to(device, non_blocking=True))
        if n:
            self.buffer(device)[:n].copy_(host, non_blocking=True)
        return BatchRows(n, uniform)

    def rows(self, num_tokens: int, device: torch.device, info: BatchRows | None) -> Tensor:
        """``[num_tokens]`` policy ids of the running forward (the buffer's first rows)."""
        if info is not None and info.rows is not None and info.rows.shape[0] == num_tokens:
            return info.rows
        if num_tokens > CAPACITY:  # a large forward SGLang built without a batch (never mixed): the default
            return torch.full((num_tokens,), self.default, dtype=torch.int32, device=device)
        return self.buffer(device)[:num_tokens]


def request_policies(batch, pset: PolicySet) -> tuple[list[int], list[int], list[bool]]:
    """``(policy id, tokens in this forward, is a decode row)`` of each request of a ScheduleBatch."""
    mode = batch.forward_mode
    reqs = list(batch.reqs or ())
    decode = mode.is_decode()
    if mode.is_idle():
        return [], [], []
    lens = [1] * len(reqs) if decode else list(batch.extend_lens or [])
    decoding = {id(r) for r in (getattr(batch, "decoding_reqs", None) or ())}
    per_req = []
    for r in reqs:
        try:
            per_req.append(pset.index(requested_name(r.sampling_params.custom_params)))
        except UnknownPolicy as e:  # the tokenizer-side check refuses these; a request that bypassed it
            log.error("sgl_budget: %s; routing request %s with the default policy", e, getattr(r, "rid", "?"))
            per_req.append(pset.default)
    return per_req, [int(n) for n in lens], [decode or id(r) in decoding for r in reqs]


def token_ids(per_req: list[int], lens: list[int]) -> list[int]:
    """The forward's token -> policy ids (requests' tokens are contiguous, in batch order)."""
    ids: list[int] = []
    for p, n in zip(per_req, lens):
        ids.extend([p] * n)
    return ids
