"""SERE's expert similarity measured inside the SGLang workers (calibration mode, ``sgl-budget similarity --server``).

The transformers path (:mod:`sgl_budget.engines.hf.similarity`) captures every MoE layer's expert input over the
calibration windows, samples tokens, runs every expert on them and compares the outputs. Here the same happens
where the weights are, on every rank's own shards:

* the client picks the sampled tokens (:func:`sgl_budget.similarity.sample_tokens`, the transformers path's
  draw) and sends, with each window, its positions per MoE layer (``moe_calibration.similarity``, parsed in
  :mod:`.calibration`); the window is routed with ``stock`` (the model's own top-k, as the transformers path
  runs it);
* :func:`plan_similarity` (host side, when the forward batch is built) turns them into rows of the forward
  (a request's chunk of a chunked prefill and a cached prefix are accounted for: only computed tokens are
  captured, and a session whose asked positions were not all captured reports an error instead of a matrix);
* :func:`fused_moe_forward_hook` (around SGLang 0.5.23's ``FusedMoE.forward``, whose ``hidden_states`` is the
  layer's whole expert input, replicated on every tensor-parallel rank) takes those rows before the layer runs,
  applies every local expert with the layer's own weights (``w13_weight [E_local, 2 I_shard, H]`` gate rows
  first, ``w2_weight [E_local, H, I_shard]``, the layer's gated activation), writes them at their global
  expert ids into ``[E, n, H]`` (zeros elsewhere) and sums that over the tensor-parallel group: a down
  projection sharded along I gives partial sums (moe-TP) and each expert-parallel rank fills its own experts
  (EP), so every rank ends with every expert's full output;
* each worker accumulates per-layer statistics (:class:`sgl_budget.similarity.SimilarityStats`) in a session;
  the finishing request gets the matrices in ``meta_info["sgl_budget"][0]["similarity"]``.

Fused shared experts (DeepSeek's shared expert as extra FusedMoE slots) are left out: only the routed experts,
the first ``_num_local_routed`` of each rank, are compared, as in the transformers path.

Refused (an error in the finishing report): quantized or packed expert weights (CPU AMX, fp8, ...), activations
other than gated SiLU / GELU (tanh), expert biases or clamped SwiGLU (gpt-oss), MoE data parallelism or
redundant experts (EPLB), and MoE layers that are not ``FusedMoE`` (DeepEP's) or that run inside piecewise CUDA
graphs — the last two are seen as asked tokens that were never captured.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...similarity import SimilarityStats, glu_expert_outputs
from .calibration import CALIB_ATTR, CalibrationBatch, _report_of

log = logging.getLogger("sgl_budget")
TARGET = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.forward"
MAX_SESSIONS = 8  # sessions a worker keeps (the oldest goes first: a client that died mid-way leaks nothing)
CHUNK_BYTES = 256 << 20  # [E, n, H] float32 outputs computed (and reduced) at most this large at once
CKA_BYTES = 8 << 30  # cka keeps the outputs themselves: at most this much per session (in every worker)


@dataclass
class Session:
    """One similarity measurement in a worker: per-layer statistics and the tokens asked / captured."""

    method: str
    stats: dict[int, SimilarityStats] = field(default_factory=dict)
    asked: dict[int, int] = field(default_factory=dict)
    captured: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    stored: int = 0  # bytes of outputs kept (cka)


SESSIONS: OrderedDict[str, Session] = OrderedDict()


def _session(sid: str, method: str) -> Session:
    s = SESSIONS.get(sid)
    if s is None:
        s = SESSIONS[sid] = Session(method)
        while len(SESSIONS) > MAX_SESSIONS:
            old, _ = SESSIONS.popitem(last=False)
            log.warning("sgl_budget: similarity session %s dropped (more than %d open)", old, MAX_SESSIONS)
    SESSIONS.move_to_end(sid)
    if s.method != method and s.error is None:
        s.error = f"the session's requests ask for different methods ({s.method}, {method})"
    return s


def plan_similarity(plan: CalibrationBatch, cals: list, prefix: list[int], decode: bool) -> None:
    """Host side: the forward rows each session captures per layer (``plan.similarity``), asked tokens counted
    once per request, and a finishing request's report filled with its session's matrices."""
    starts = [0]
    for n in plan.lens[:-1]:
        starts.append(starts[-1] + n)
    rows_of: dict[int, dict[str, tuple[Session, list[int]]]] = {}
    for i, (req, cal) in enumerate(zip(plan.reqs, cals)):
        ask = cal.similarity if cal is not None else None
        if ask is None:
            continue
        if ask.finish:
            if not getattr(req, "_sgl_budget_sim_done", False):
                req._sgl_budget_sim_done = True
                _report_of(req, cal)["similarity"] = finish(ask.session)
            continue
        session = _session(ask.session, ask.method)
        if not getattr(req, "_sgl_budget_sim_asked", False):  # counted once, whatever the chunking
            req._sgl_budget_sim_asked = True
            length = len(req.origin_input_ids)
            for layer, pos in ask.positions.items():
                session.asked[layer] = session.asked.get(layer, 0) + len(pos)
                if max(pos) >= length and session.error is None:
                    session.error = f"layer {layer}: position {max(pos)} is beyond the window ({length} tokens)"
        if decode:  # only the window's own (prefilled) tokens are measured
            continue
        first, last = prefix[i], prefix[i] + plan.lens[i]  # the window positions this forward computes
        for layer, pos in ask.positions.items():
            rows = [starts[i] + p - first for p in pos if first <= p < last]
            if rows:  # one capture per session and layer, whatever the requests
                rows_of.setdefault(layer, {}).setdefault(ask.session, (session, []))[1].extend(rows)
    plan.similarity = {layer: list(by.values()) for layer, by in rows_of.items()}


def finish(sid: str) -> dict:
    """The session's report (``{"method", "tokens", "matrices"}`` or ``{"error"}``); the session ends."""
    session = SESSIONS.pop(sid, None)
    if session is None:
        return {"error": f"no similarity session {sid!r} in this worker (never started, or dropped: at most "
                         f"{MAX_SESSIONS} are kept)"}
    if session.error:
        return {"error": session.error}
    missing = {l: (n, session.captured.get(l, 0)) for l, n in session.asked.items() if session.captured.get(l, 0) != n}
    if missing:
        l, (n, got) = next(iter(sorted(missing.items())))
        return {"error": f"layer {l}: {n} tokens asked, {got} captured (was part of a window served from the prefix "
                         "cache, or does this MoE layer not run SGLang's FusedMoE.forward eagerly: DeepEP, "
                         "piecewise CUDA graphs?)"}
    if not session.stats:
        return {"error": "the session measured no tokens"}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    try:
        matrices = {str(l): s.matrix().tolist() for l, s in sorted(session.stats.items())}
    except ValueError as e:
        return {"error": str(e)}
    return {"method": session.method, "tokens": {str(l): s.tokens for l, s in sorted(session.stats.items())},
            "matrices": matrices}


# -- worker: the MoE layer --------------------------------------------------------------------------------

def fused_moe_forward_hook(original, self, hidden_states, topk_output, *args, **kwargs):
    """Around ``FusedMoE.forward``: a calibration forward's sampled rows measured before the layer runs (its
    kernels may write the output into ``hidden_states``)."""
    plan = _plan()
    if plan is not None and plan.similarity:
        asks = plan.similarity.get(getattr(self, "layer_id", None))
        if asks:
            with torch.no_grad():
                capture(self, hidden_states, asks, plan)
    return original(self, hidden_states, topk_output, *args, **kwargs)


def _plan() -> CalibrationBatch | None:
    from .context import current_forward_batch

    fb = current_forward_batch()
    return getattr(fb, CALIB_ATTR, None) if fb is not None else None


def capture(layer, hidden_states: Tensor, asks: list, plan: CalibrationBatch) -> None:
    """Every expert's output on each session's rows of this layer's input, summed over the ranks, into the
    session. Every check depends only on what all ranks share (the plan, the layer's shapes), so the ranks
    take the same collectives."""
    layer_id = layer.layer_id
    problem = layer_problem(layer, hidden_states)
    if problem is None and layer_experts(layer) != plan.irs[0].spec.num_experts:
        problem = (f"the layer holds {layer_experts(layer)} experts, the model {plan.irs[0].spec.num_experts} "
                   "(redundant experts, EPLB: not supported)")
    if problem is None and hidden_states.shape[0] != sum(plan.lens):
        problem = (f"the MoE layer sees {hidden_states.shape[0]} rows, the forward has {sum(plan.lens)} tokens "
                   "(scattered or gathered MoE input: not supported)")
    scale = plan.expert_scales.get(layer_id)
    for session, rows in asks:
        if session.error:
            continue
        if problem:
            session.error = f"layer {layer_id}: {problem}"
            continue
        stats = session.stats.setdefault(layer_id, SimilarityStats(session.method))
        idx = torch.tensor(rows, dtype=torch.long, device=hidden_states.device)
        x = hidden_states.index_select(0, idx)
        e, h = layer_experts(layer), x.shape[-1]
        step = max(1, CHUNK_BYTES // (4 * e * h))
        if session.method == "cka":
            session.stored += 4 * e * h * len(rows)
            if session.stored > CKA_BYTES:
                session.error = (f"--method cka keeps every expert's outputs (experts x tokens x hidden floats, per "
                                 f"MoE layer): over {CKA_BYTES >> 30} GiB here; use fewer --tokens, or frobenius / "
                                 "cosine (accumulated as they arrive)")
                continue
        try:
            for a in range(0, x.shape[0], step):
                outs = all_expert_outputs(layer, x[a:a + step])
                if scale is not None:  # Gemma 4: an expert's contribution carries its per-expert scale
                    outs = outs * scale.float().to(outs.device)[:, None, None]
                stats.add(outs)
        except ValueError as err:  # cka over its memory bound
            session.error = f"layer {layer_id}: {err}"
            continue
        session.captured[layer_id] = session.captured.get(layer_id, 0) + len(rows)


def layer_experts(layer) -> int:
    """Routed experts of the model (global)."""
    return int(getattr(layer, "_num_global_routed", layer.num_experts))


def _local_routed(layer) -> int:
    return int(getattr(layer, "_num_local_routed", layer.num_local_experts))


def layer_problem(layer, hidden_states: Tensor) -> str | None:
    """Why this layer's experts cannot be run here (None: they can)."""
    from sglang.srt.distributed.parallel_state import get_tp_group

    cfg = layer.moe_runner_config
    method = type(getattr(layer, "quant_method", None)).__name__
    if method != "UnquantizedFusedMoEMethod" or getattr(layer, "use_intel_amx_backend", False):
        return (f"its expert weights are quantized or packed ({method}"
                f"{', CPU AMX layout' if getattr(layer, 'use_intel_amx_backend', False) else ''}): only "
                "unquantized weights in SGLang's plain layout are supported")
    if not cfg.is_gated or cfg.activation not in ("silu", "gelu") or cfg.gemm1_alpha is not None \
            or cfg.gemm1_clamp_limit is not None or getattr(cfg, "swiglu_limit", None) is not None:
        return f"activation {cfg.activation!r} (gated={cfg.is_gated}, alpha/limit set?) is not supported"
    if getattr(layer, "w13_weight_bias", None) is not None or getattr(layer, "w2_weight_bias", None) is not None:
        return "expert biases are not supported"
    e, local = layer_experts(layer), _local_routed(layer)
    ep, tp = int(layer.moe_ep_size), int(layer.moe_tp_size)
    if local * ep != e or getattr(layer, "_expert_storage_rank", layer.moe_ep_rank) != layer.moe_ep_rank:
        return f"{local} local experts on each of {ep} expert-parallel ranks do not make the model's {e}"
    if _eplb():
        return "expert placement by EPLB (--enable-eplb / redundant experts) is not supported"
    if get_tp_group().world_size != ep * tp:
        return "MoE data parallelism (tensor-parallel ranks beyond moe-EP x moe-TP) is not supported"
    w13, w2 = layer.w13_weight, layer.w2_weight
    i, h = int(layer.intermediate_size_per_partition), hidden_states.shape[-1]
    if tuple(w13.shape[1:]) != (2 * i, h) or tuple(w2.shape[1:]) != (h, i) or not w13.is_floating_point():
        return (f"expert weights w13 {list(w13.shape)} / w2 {list(w2.shape)} are not in the plain layout "
                f"[E, 2*{i}, {h}] / [E, {h}, {i}] (padded or repacked)")
    return None


def _eplb() -> bool:
    try:
        from sglang.srt.runtime_context import get_exec

        moe = get_exec().moe
    except Exception:  # pragma: no cover - not in a launched worker (tests)
        return False
    return bool(getattr(moe, "enable_eplb", False) or getattr(moe, "ep_num_redundant_experts", 0))


def _activation(name: str):
    if name == "silu":
        return torch.nn.functional.silu
    return lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # SGLang's GeluAndMul


def all_expert_outputs(layer, x: Tensor) -> Tensor:
    """``[E, n, H]`` float32: every routed expert of the model on ``x [n, H]``, identical on every rank."""
    from sglang.srt.distributed.parallel_state import get_tp_group

    local = _local_routed(layer)
    outs = glu_expert_outputs(x.float(), layer.w13_weight[:local].float(), layer.w2_weight[:local].float(),
                              _activation(layer.moe_runner_config.activation))
    group = get_tp_group()
    if group.world_size == 1:
        return outs
    full = outs.new_zeros(layer_experts(layer), *outs.shape[1:])
    first = int(layer.moe_ep_rank) * local
    full[first:first + local] = outs
    return group.all_reduce(full)


def register() -> None:
    """Install the capture hook in this worker (calibration launches)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, fused_moe_forward_hook, HookType.AROUND)
