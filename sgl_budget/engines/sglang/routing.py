"""Per-layer routing injection into SGLang's ``select_experts`` (runs inside every model worker).

``select_experts(hidden_states, router_logits, topk_config, *, layer_id, ...)`` in
``sglang.srt.layers.moe.topk`` is what every ``TopK.forward_*`` calls for the
standard output format. The hook keys on ``layer_id`` (the real decoder-layer
index SGLang's models pass to ``TopK``) and:

* runs SGLang's own function unchanged for layers and contexts whose plan is the
  model's own top-k, so those stay bit-for-bit stock (and keep SGLang's fused kernels);
* otherwise routes with the layer's compiled :class:`~sgl_budget.routing.LayerRouter`
  under SGLang's conventions, pads to the model's top-k width, writes the fused
  shared-expert columns the way SGLang's gate does, and hands the result to SGLang's
  own post-processing (EPLB logical->physical remap, padded-row mask, capture).

Padded slots are id -1 with weight 0 on CUDA runners (which already skip -1, as
SGLang itself writes -1 into padded rows) and on the CPU engine's native MoE path
(taught to skip them, :mod:`.native_moe`); on CUDA's torch-native path, HIP and CPU
AMX kernels they hold a distinct expert the token does not use, with weight 0,
because those paths index expert weights with the ids.

Under expert parallelism (``--ep-size``) the ids written here stay global (and identical on every
rank: the router logits and the batch are): SGLang's ``StandardDispatcher`` maps them to the rank's
local experts afterwards (a -1 stays -1, other ranks' experts become -1, with their weights kept),
each rank computes its own pairs and the model all-reduces the partial sums — so a padded slot,
-1 or a weight-0 filler, adds exactly 0 on whichever rank holds it.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ...lang.ir import LayerPlan, PolicyIR
from ...lang.policy_set import PolicySet
from ...routing import Conventions, LayerRouter, MixedRouter, routed_per_policy
from ...routing.scoring import apply_expert_scale
from ...spec import ModelSpec
from .calibration import CALIB_ATTR, CalibrationBatch, PolicyCache, lockstep_unview, lockstep_view, plan_batch, \
    record_layer
from .context import current_forward_batch, route_context
from .native_moe import native_path_skips_minus_one
from .requests import ROWS_ATTR, BatchRows, RowPolicies, request_policies, token_ids
from .stats import PolicyStats

log = logging.getLogger("sgl_budget")
FIXED_CACHE = 4096  # forward shapes whose per-layer fixed-k decisions are kept (see _uniform_fixed_k)
CALIBRATION_ROUTERS = 512  # layer routers of request policies kept per worker (calibration mode)
SGLANG_RENORM_EPSILON = 1e-20  # sglang.srt.layers.moe.topk._RENORMALIZE_SUM_EPSILON


def sglang_conventions(topk_config) -> Conventions:
    """What SGLang's reference top-k paths do for this TopK (see topk.py: fused_topk_torch_native,
    grouped_topk_gpu, biased_grouped_topk_impl) on this device: where its own top-k drops the correction
    bias (:func:`stock_drops_correction_bias`), policies rank by the unbiased scores too."""
    drops = stock_drops_correction_bias(topk_config)
    biased = topk_config.correction_bias is not None and not drops
    grouped = bool(topk_config.use_grouped_topk)
    return Conventions(
        renorm_eps=SGLANG_RENORM_EPSILON,
        apply_routed_scaling=bool(topk_config.apply_routed_scaling_factor_on_output),
        sorted_selection=not (biased or grouped),
        scores_in_logit_dtype=biased or grouped,
        ignore_correction_bias=drops,
        # SGLang's torch paths sum the chosen weights in float32 (fused_topk_torch_native, biased_grouped_topk_impl);
        # followed for sqrtsoftplus (DeepSeek-V4) only, so the other families' routing stays as it was
        renorm_sum_fp32=topk_config.scoring_func == "sqrtsoftplus",
        # Gemma 4's routing function: torch.topk of the raw logits, softmax over the chosen logits
        weights_from_selected_logits=expert_scale_of(topk_config) is not None,
    )


GEMMA4_ROUTING = "sglang.srt.models.gemma4_causal"  # the module whose Gemma4MoE defines Gemma 4's routing function


def expert_scale_of(topk_config):
    """The ``[E]`` per-expert scale Gemma 4's routing function multiplies in (None for any other TopK).

    SGLang 0.5.23's ``Gemma4MoE`` routes through ``TopK(custom_routing_function=routing_function)``, a closure over
    its ``per_expert_scale`` parameter (loaded in place, so the closure sees the checkpoint's values). On CPU it
    computes ``torch.topk(logits, k)``, ``softmax`` of the chosen logits in their dtype, times
    ``per_expert_scale[ids]`` cast to that dtype, then float32; on CUDA one Triton kernel does the same in float32
    (ties: lower expert id first). sgl_budget routes that rule (:func:`sglang_conventions`) and multiplies the same
    scale in (:func:`~sgl_budget.routing.scoring.apply_expert_scale`) by the expert each slot finally uses.
    """
    fn = topk_config.custom_routing_function
    code = getattr(fn, "__code__", None)
    if (fn is None or code is None or getattr(fn, "__module__", None) != GEMMA4_ROUTING
            or "per_expert_scale" not in code.co_freevars or not fn.__closure__):
        return None
    return fn.__closure__[code.co_freevars.index("per_expert_scale")].cell_contents


def stock_drops_correction_bias(topk_config) -> bool:
    """Whether SGLang 0.5.23's ``select_experts`` ignores this TopK's correction bias (ERNIE-4.5-MoE on CUDA).

    An ungrouped softmax TopK with a bias (ERNIE's) takes ``fused_topk`` unless ``torch_native`` is set
    (``TopK.forward_native``: the CPU engine without AMX); on GPUs ``fused_topk``'s softmax kernels (the JIT
    ``moe_fused_gate``, aiter, sgl_kernel ``topk_softmax``) never read the bias, so stock routing there is plain
    softmax top-k. The CPU engine's ``fused_topk_cpu`` (AMX) and ``fused_topk_torch_native`` apply it.
    """
    if (topk_config.correction_bias is None or topk_config.use_grouped_topk or topk_config.scoring_func != "softmax"
            or topk_config.custom_routing_function is not None or topk_config.torch_native):
        return False
    from sglang.srt.layers.moe import topk as T

    return T.fused_topk is not getattr(T, "fused_topk_cpu", None)


def check_topk_matches_spec(spec: ModelSpec, topk_config, num_experts: int, layer_id: int) -> None:
    """Refuse a TopK whose routing rule differs from the spec the policy was validated against."""
    routed = topk_config.top_k - topk_config.num_shared_topk_slots
    problems = []
    if num_experts != spec.num_experts:
        problems.append(f"router logits have {num_experts} experts, the spec {spec.num_experts}")
    if routed != spec.top_k:
        problems.append(f"TopK selects {routed} routed experts, the spec top-{spec.top_k}")
    # DeepSeek blocks always take the grouped path (n_group may be 1) and leave scoring_func at its
    # default while selecting with sigmoid + correction bias
    grouped = bool(topk_config.use_grouped_topk) and (topk_config.num_expert_group or 1) > 1
    if grouped != spec.grouped:
        problems.append(f"grouped top-k is {grouped} in SGLang, {spec.grouped} in the spec")
    if (topk_config.correction_bias is not None) != spec.has_correction_bias:
        problems.append("correction bias presence differs")
    scaled = expert_scale_of(topk_config) is not None  # Gemma 4's own function: a rule sgl_budget routes
    if topk_config.custom_routing_function is not None and not (scaled and spec.has_expert_scale):
        fn = getattr(topk_config.custom_routing_function, "__qualname__", "custom_routing_function")
        problems.append(f"the model routes with its own function ({fn}), whose rule the spec does not describe")
    if spec.has_expert_scale and not scaled:
        problems.append("the spec multiplies a per-expert scale in, which this TopK has none of")
    # SGLang's grouped biased path (DeepSeek-V3, GLM-4) scores with sigmoid whatever scoring_func says
    biased_grouped = topk_config.correction_bias is not None and bool(topk_config.use_grouped_topk)
    scoring = "sigmoid" if biased_grouped else topk_config.scoring_func
    if scoring != spec.scoring_func:
        problems.append(f"scoring {scoring!r} vs {spec.scoring_func!r}")
    if getattr(topk_config, "sqrtsoftplus_log1p", False):  # DeepSeek-V4.1: NaNs ranked first, log1p form
        problems.append("the TopK scores with sqrtsoftplus through log1p (sqrtsoftplus_log1p, DeepSeek-V4.1), a rule "
                        "the spec does not describe")
    if bool(topk_config.renormalize) != spec.norm_topk_prob:
        problems.append(f"renormalize={topk_config.renormalize} vs norm_topk_prob={spec.norm_topk_prob}")
    if problems:
        raise RuntimeError(f"sgl_budget: layer {layer_id}'s TopK does not match model spec {spec.name!r} the policy "
                           f"was validated against: {'; '.join(problems)}. This model family is not supported "
                           "by --moe-policy yet.")


def fill_padding(ids: Tensor, valid: Tensor, num_experts: int) -> Tensor:
    """Give padded slots distinct experts the token does not hold, preferring experts the batch already loads.

    Runners that index weights by id (torch-native, CPU, HIP) then compute no expert the batch
    would not read anyway where possible. Vectorised, no host sync.
    """
    e = num_experts
    idx = ids.long().masked_fill(~valid, e)
    held = torch.zeros(ids.shape[0], e + 1, dtype=torch.bool, device=ids.device).scatter_(1, idx, True)[:, :e]
    in_batch = held.any(dim=0, keepdim=True)
    rank = torch.where(held, 2 * e, torch.where(in_batch, 0, e)) + torch.arange(e, device=ids.device)
    free = torch.topk(rank, ids.shape[1], dim=1, largest=False).indices  # best fillers first
    pad_pos = torch.cumsum((~valid).long(), dim=1) - 1  # the k-th padded slot takes the k-th filler
    filler = free.gather(1, pad_pos.clamp_min(0))
    return torch.where(valid, ids.long(), filler).to(ids.dtype)


@dataclass
class PolicyRouting:
    """One worker's policies (default, stock, named) and their per-layer routers (built on first use of each layer).

    Each forward's rows carry a policy id (:mod:`.requests`); a batch whose rows share one policy
    routes with that policy alone, a mixed batch with :class:`~sgl_budget.routing.MixedRouter`.
    """

    pset: PolicySet
    stats: PolicyStats | None = None
    routers: dict[tuple[int, bool], MixedRouter] = field(default_factory=dict)  # (layer, bias dropped) -> router
    rows: RowPolicies | None = None
    stock_fast_path: bool = True  # fixed-k plans run SGLang's own select_experts (tests turn this off)
    calibration: PolicyCache | None = None  # set: calibration mode (request policies compiled here)
    calibration_routers: OrderedDict = field(default_factory=OrderedDict)  # (layer, drop, key) -> LayerRouter
    _checked: set = field(default_factory=set)  # layers whose TopK was checked against the spec (fixed-k path)
    _configs: dict = field(default_factory=dict)  # (id(TopKConfig), k, torch_native) -> (config, config at k)
    _fixed: dict = field(default_factory=dict)  # (policy, tokens, decode, batch) -> {layer: fixed k or None}

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = RowPolicies(self.pset.default)

    @property
    def ir(self) -> PolicyIR:
        """The default policy."""
        return self.pset.irs[self.pset.default]

    def router(self, layer_id: int, topk_config, num_experts: int) -> MixedRouter:
        # keyed by whether SGLang's own top-k drops the bias on the path that called (ERNIE: CUDA vs torch-native)
        key = (layer_id, stock_drops_correction_bias(topk_config))
        got = self.routers.get(key)
        if got is None:
            spec = self.ir.spec
            if not spec.is_moe_layer(layer_id):
                raise RuntimeError(f"sgl_budget: SGLang routed layer {layer_id}, which is not an MoE layer of "
                                   f"{spec.name} (MoE layers {list(spec.moe_layers)})")
            check_topk_matches_spec(spec, topk_config, num_experts, layer_id)
            conv = sglang_conventions(topk_config)
            device = topk_config.correction_bias.device if topk_config.correction_bias is not None else None
            per_policy = []
            for ir in self.pset.irs:
                r = _router(ir, layer_id, conv)
                r.prepare(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # tables before any capture
                per_policy.append(r)
            got = self.routers[key] = MixedRouter(per_policy, spec.top_k)
        return got

    def on_forward_batch(self, batch, forward_batch) -> None:
        """Host side, when SGLang builds a forward batch: its row -> policy map (device buffer) and counts."""
        if self.calibration is not None:
            plan = plan_batch(batch, self.pset, self.calibration)
            if plan is not None:  # routed by _select_calibration; not counted in the serving statistics
                for i, why in plan.errors.items():
                    log.warning("sgl_budget: calibration request %s: %s", getattr(plan.reqs[i], "rid", "?"), why)
                setattr(forward_batch, CALIB_ATTR, plan)
                return
        per_req, lens, decoding = request_policies(batch, self.pset)
        ids = forward_batch.input_ids if forward_batch.input_ids is not None else forward_batch.seq_lens
        setattr(forward_batch, ROWS_ATTR, self.rows.fill(token_ids(per_req, lens), ids.device))
        if self.stats is not None:
            self.stats.on_batch(per_req, decoding, lens, batch.reqs)

    def select_experts(self, original, hidden_states: Tensor, router_logits: Tensor, topk_config, *,
                       layer_id=None, num_token_non_padded=None, expert_location_dispatch_info=None,
                       dynamic_expert_bias=None, router_logits_partials=None):
        """Drop-in for SGLang's ``select_experts`` (same signature, same output type)."""
        kwargs = dict(layer_id=layer_id, num_token_non_padded=num_token_non_padded,
                      expert_location_dispatch_info=expert_location_dispatch_info,
                      dynamic_expert_bias=dynamic_expert_bias, router_logits_partials=router_logits_partials)
        if layer_id is None or dynamic_expert_bias is not None:
            return original(hidden_states, router_logits, topk_config, **kwargs)
        spec = self.ir.spec
        num_tokens = router_logits.shape[0]
        fb = current_forward_batch()
        if not spec.is_moe_layer(layer_id):
            self.router(layer_id, topk_config, router_logits.shape[-1])  # raises the explanatory error
        plan = getattr(fb, CALIB_ATTR, None) if fb is not None else None
        if plan is not None:
            return self._select_calibration(original, hidden_states, router_logits, topk_config, plan,
                                            route_context(num_tokens, fb), kwargs)
        info: BatchRows | None = getattr(fb, ROWS_ATTR, None) if fb is not None else None
        # every row of one policy (known on the host), else a mixed batch (the row map on the device)
        uniform = info.uniform if info is not None else (0 if len(self.pset) == 1 else None)
        if uniform is not None:  # one policy: a fixed k runs SGLang's own select_experts at that k
            k = self._uniform_fixed_k(uniform, layer_id, num_tokens, fb)
            if k is not None:
                out = self._select_fixed(original, k, hidden_states, router_logits, topk_config, kwargs)
                if out is not None:
                    if self.stats is not None:
                        self._count_fixed(k, uniform, num_tokens, info, num_token_non_padded, router_logits.device)
                    return out
        ctx = route_context(num_tokens, fb)
        if uniform is None and all(self.fixed_k(ir.plan(layer_id, ctx), num_tokens) == spec.top_k
                                   for ir in self.pset.irs):
            if self.stats is not None:  # SGLang's own path routes top-k for every row
                self._count_fixed(spec.top_k, None, num_tokens, info, num_token_non_padded, router_logits.device)
            return original(hidden_states, router_logits, topk_config, **kwargs)
        router = self.router(layer_id, topk_config, router_logits.shape[-1])
        router_logits, bias = _select_inputs(router_logits, topk_config, expert_location_dispatch_info,
                                             router_logits_partials)
        row_mask = _row_mask(num_tokens, num_token_non_padded, router_logits.device)
        rows = None if uniform is not None else self.rows.rows(num_tokens, router_logits.device, info)
        weights, ids = _route(router, router_logits, topk_config, ctx, correction_bias=bias, row_policy=rows,
                              row_mask=row_mask, uniform=uniform)
        if self.stats is not None:
            self._count((ids >= 0).sum(dim=-1), uniform, num_tokens, info, row_mask, router_logits.device)
        irs = self.pset.irs if uniform is None else (self.pset.irs[uniform],)
        padded = not all(_full_width(ir.plan(layer_id, ctx), spec.top_k) for ir in irs)
        return _standard_output(weights, ids, router_logits, topk_config, spec.num_experts, kwargs, padded=padded)

    def _uniform_fixed_k(self, policy: int, layer_id: int, num_tokens: int, fb) -> int | None:
        """:meth:`fixed_k` of ``policy``'s plan for this layer in this forward, from a cache keyed by what the route
        context is made of (phase, batch size, tokens): the plans are the same for every layer call of a forward."""
        if not self.stock_fast_path:
            return None
        if fb is None:
            key = (policy, num_tokens, True, num_tokens)
        else:
            key = (policy, num_tokens, fb.forward_mode.is_decode(), getattr(fb, "batch_size", None))
        got = self._fixed.get(key)
        if got is None:
            if len(self._fixed) >= FIXED_CACHE:  # prefills of every length: keep it bounded
                self._fixed.clear()
            plans = self.pset.irs[policy].plans(route_context(num_tokens, fb))
            got = self._fixed[key] = {layer: self.fixed_k(p, num_tokens) for layer, p in plans.items()}
        return got[layer_id]

    def fixed_k(self, plan: LayerPlan, num_tokens: int) -> int | None:
        """The k every token of this forward routes under ``plan`` when that is plain top-k (SGLang's own function
        computes it), else None (the reference router runs).

        A fixed-k plan (:attr:`~sgl_budget.lang.ir.LayerPlan.is_stock_shape`) is top-k at its k. So is Alloc-T over
        a forward of ONE token (batch-1 decode): the layer's pool is that token's ``routed_k(k)`` slots, it keeps
        ``min_k`` and takes the rest by rank, i.e. its top ``routed_k(k)`` experts, renormalised over them.
        """
        if not self.stock_fast_path:
            return None
        if plan.is_stock_shape:
            return plan.k
        re = plan.reallocation
        if num_tokens == 1 and re is not None and plan.reroute is None and plan.piggyback is None:
            return re.routed_k(plan.k)
        return None

    def _select_fixed(self, original, k: int, hidden_states: Tensor, router_logits: Tensor, topk_config,
                      kwargs: dict):
        """SGLang's own ``select_experts`` with ``top_k`` = ``k`` routed slots (+ the fused shared-expert slots),
        padded to the model's top-k width (None: a case this path leaves to the reference router)."""
        top_k = self.ir.spec.top_k
        if k == top_k:  # the model's own routing, bit for bit
            return original(hidden_states, router_logits, topk_config, **kwargs)
        layer_id = kwargs["layer_id"]
        if layer_id not in self._checked:  # the model checks the reference path makes, once per layer
            self.router(layer_id, topk_config, router_logits.shape[-1])
            self._checked.add(layer_id)
        T = _topk_module()
        if T.get_global_experts_capturer() is not None:  # its buffer is the model's width (the reference pads first)
            return None
        minus_one = _runner_skips_minus_one(topk_config, router_logits)
        if not minus_one and kwargs["expert_location_dispatch_info"] is not None:
            return None  # fillers would have to be physical ids (EPLB): the reference path
        out = original(hidden_states, router_logits, self._config_at(topk_config, k), **kwargs)
        if minus_one and not router_logits.is_cuda and out.topk_ids.shape[1] == k:
            # the CPU engine's native MoE path (SGLang's moe_forward_native behind sgl_budget's hook) takes any
            # width: SGLang's output at k is exactly what it computes, padding would only be skipped again
            return out
        ids, weights = _pad_columns(out.topk_ids, out.topk_weights, k, top_k, self.ir.spec.num_experts, minus_one)
        return T.StandardTopKOutput(weights, ids, out.router_logits)

    def _config_at(self, topk_config, k: int):
        """``topk_config`` selecting ``k`` routed experts (cached: SGLang fixes a TopK's config before serving;
        ``TopK.forward_native`` sets ``torch_native``, hence in the key)."""
        key = (id(topk_config), k, topk_config.torch_native)
        got = self._configs.get(key)
        if got is None or got[0] is not topk_config:
            got = self._configs[key] = (topk_config, replace(topk_config, top_k=k + topk_config.num_shared_topk_slots))
        return got[1]

    def _select_calibration(self, original, hidden_states: Tensor, router_logits: Tensor, topk_config,
                            plan: CalibrationBatch, ctx, kwargs: dict):
        """A forward carrying calibration requests (:mod:`.calibration`): each request's policy (named or sent as
        text), lock-step groups routed as decode steps of their B rows, routing statistics into the reports."""
        spec = self.ir.spec
        layer_id = kwargs["layer_id"]
        ctx = plan.context(ctx)
        if layer_id in plan.similarity and expert_scale_of(topk_config) is not None:  # for .expert_similarity
            plan.expert_scales[layer_id] = expert_scale_of(topk_config)
        keys = list(dict.fromkeys(plan.keys))
        irs = [plan.irs[plan.keys.index(k)] for k in keys]

        if self.stock_fast_path and all(_full_width(ir.plan(layer_id, ctx), spec.top_k) for ir in irs):
            # SGLang's own routing (per token: lock-step changes nothing)
            out = original(hidden_states, router_logits, topk_config, **kwargs)
            record_layer(plan, out.topk_ids[:, :spec.top_k], spec.num_experts)
            return out
        router = self._calibration_router(layer_id, topk_config, router_logits.shape[-1], keys, irs)
        router_logits, bias = _select_inputs(router_logits, topk_config, kwargs["expert_location_dispatch_info"],
                                             kwargs["router_logits_partials"])
        uniform = 0 if len(keys) == 1 else None
        rows = None
        if uniform is None:
            per_req = [keys.index(k) for k in plan.keys]
            rows = torch.tensor(token_ids(per_req, plan.lens), dtype=torch.int32, device=router_logits.device)
        if plan.lockstep:
            view = lockstep_view(router_logits, plan)
            weights, ids = _route(router, view, topk_config, ctx, correction_bias=bias, uniform=uniform,
                                  row_policy=None if rows is None else lockstep_view(rows, plan))
            weights, ids = lockstep_unview(weights, plan), lockstep_unview(ids, plan)
        else:
            weights, ids = _route(router, router_logits, topk_config, ctx, correction_bias=bias, row_policy=rows,
                                  uniform=uniform)
        record_layer(plan, ids, spec.num_experts)
        return _standard_output(weights, ids, router_logits, topk_config, spec.num_experts, kwargs)

    def _calibration_router(self, layer_id: int, topk_config, num_experts: int, keys: list[str],
                            irs: list[PolicyIR]) -> MixedRouter:
        """A router over the policies of one calibration forward; each policy's layer router built once (the
        launch's policies share :meth:`router`'s, request policies are kept for the most recent ones)."""
        self.router(layer_id, topk_config, num_experts)  # the model checks, once per layer
        drop = stock_drops_correction_bias(topk_config)
        conv = sglang_conventions(topk_config)
        device = topk_config.correction_bias.device if topk_config.correction_bias is not None else None
        per = []
        for key, ir in zip(keys, irs):
            if key.startswith("named:"):
                per.append(self.routers[(layer_id, drop)].routers[int(key[6:])])
                continue
            ck = (layer_id, drop, key)
            r = self.calibration_routers.get(ck)
            if r is None:
                r = _router(ir, layer_id, conv)
                r.prepare(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                self.calibration_routers[ck] = r
                while len(self.calibration_routers) > CALIBRATION_ROUTERS:
                    self.calibration_routers.popitem(last=False)
            self.calibration_routers.move_to_end(ck)
            per.append(r)
        return MixedRouter(per, self.ir.spec.top_k)

    def _count_fixed(self, k: int, uniform: int | None, num_tokens: int, info, num_token_non_padded,
                     device) -> None:
        """A layer routed by SGLang's own top-k at ``k`` for every row: counted on the host when every row is one
        policy's and real, else on the device (CUDA-graph padding rows left out)."""
        assert self.stats is not None
        if uniform is not None and num_token_non_padded is None:
            self.stats.add_stock(uniform, num_tokens, k)
            return
        self._count(torch.full((num_tokens,), k, device=device), uniform, num_tokens, info,
                    _row_mask(num_tokens, num_token_non_padded, device), device)

    def _count(self, per_row: Tensor, uniform: int | None, num_tokens: int, info, row_mask: Tensor | None,
               device) -> None:
        """Routed slots (``per_row`` ``[T]``) and tokens of this layer into the per-policy device counters (no sync)."""
        assert self.stats is not None
        if uniform is not None and row_mask is None:  # one device op: every row is the policy's
            self.stats.add_uniform(uniform, per_row.sum(), num_tokens)
            return
        if uniform is not None:
            rows = torch.full((num_tokens,), uniform, dtype=torch.int32, device=device)
        else:
            rows = self.rows.rows(num_tokens, device, info)
        self.stats.add_routed(*routed_per_policy(per_row, rows, len(self.pset), row_mask))


def _row_mask(num_tokens: int, num_token_non_padded: Tensor | None, device) -> Tensor | None:
    """``[T]`` bool: the real rows (CUDA-graph padding rows take no part in batch-wide stages nor in the counts)."""
    if num_token_non_padded is None:
        return None
    return torch.arange(num_tokens, device=device) < num_token_non_padded


def _route(router: MixedRouter, router_logits: Tensor, topk_config, ctx, **kwargs) -> tuple[Tensor, Tensor]:
    """``router``'s ``(weights, ids)`` for these logits, with Gemma 4's per-expert scale applied as SGLang does."""
    scale = expert_scale_of(topk_config)
    # Gemma 4 weighs in the logits' dtype on CPU, in float32 in its CUDA kernel
    logits = router_logits.float() if scale is not None and router_logits.is_cuda else router_logits
    weights, ids = router(logits, ctx, **kwargs)
    if scale is not None:  # x per_expert_scale of each slot's final expert, in that dtype
        weights = apply_expert_scale(weights, ids, scale, dtype=logits.dtype)
    return weights, ids


def _select_inputs(router_logits: Tensor, topk_config, dispatch_info, partials) -> tuple[Tensor, Tensor | None]:
    """The router logits and correction bias as SGLang's ``select_experts`` prepares them (ROCm partials reduced,
    EPLB's logical view)."""
    from sglang.srt.layers.moe import topk as T

    if partials is not None:
        T.rocm_router_reduce_partials(partials, router_logits)
    router_logits, bias = T.expert_location_dispatch.transform_select_experts_inputs(
        router_logits=router_logits, correction_bias=topk_config.correction_bias, info=dispatch_info)
    if bias is not None and bias.dim() == 2 and bias.shape[0] == 1:  # ERNIE's [1, E] (squeezed on CPU / NPU)
        bias = bias.reshape(bias.shape[1])
    return router_logits, bias


def _full_width(plan: LayerPlan, top_k: int) -> bool:
    """Whether every token routes exactly ``top_k`` experts under ``plan`` (no padded slot, known on the host)."""
    return plan.is_stock_shape and plan.k == top_k


def _standard_output(weights: Tensor, ids: Tensor, router_logits: Tensor, topk_config, num_experts: int,
                     kwargs: dict, padded: bool = True):
    """A routed ``(weights, ids)`` (-1 = padded slot) as SGLang's ``StandardTopKOutput``: padding filled with valid
    ids through SGLang's own post-processing (EPLB remap, padded-row mask, capture), fused shared-expert columns
    appended, the padded slots restored for the runner. ``padded=False`` (no slot can be -1, known on the host)
    skips the fill and restore."""
    from sglang.srt.layers.moe import topk as T

    layer_id = kwargs["layer_id"]
    minus_one = _runner_skips_minus_one(topk_config, ids)
    # valid ids everywhere through SGLang's remap and recorder; with neither (no EPLB table, recorder off) a runner
    # that skips -1 takes the -1 slots through SGLang's post-processing as they are (it writes -1 itself)
    fill = padded and not (minus_one and kwargs["expert_location_dispatch_info"] is None and _recorder_off())
    valid = ids >= 0 if fill else None
    if fill:
        ids = fill_padding(ids, valid, num_experts)
    n_shared = topk_config.num_shared_topk_slots
    if n_shared and not (T._use_aiter or T.has_per_rank_fused_shared_slots(n_shared)):
        weights, ids = _append_shared(weights, ids, topk_config, num_experts)
    ids, weights, recorder_ids = T._post_process_topk_ids(
        topk_ids=ids, topk_weights=weights, topk_config=topk_config, router_logits=router_logits,
        num_token_non_padded=kwargs["num_token_non_padded"], layer_id=layer_id,
        expert_location_dispatch_info=kwargs["expert_location_dispatch_info"])
    if fill:
        ids, weights = _restore_padding(ids, weights, valid, minus_one=minus_one)
    if recorder_ids is not None:
        T.get_global_expert_distribution_recorder().on_select_experts(topk_ids=recorder_ids)
    return T.StandardTopKOutput(weights, ids, router_logits)


def _recorder_off() -> bool:
    """Whether SGLang's expert-distribution recorder is its no-op (no --expert-distribution-recorder-mode)."""
    from sglang.srt.eplb.expert_distribution import _ExpertDistributionRecorderNoop, \
        get_global_expert_distribution_recorder

    return isinstance(get_global_expert_distribution_recorder(), _ExpertDistributionRecorderNoop)


def _router(ir: PolicyIR, layer: int, conv: Conventions) -> LayerRouter:
    """Triton kernels on CUDA where they apply, the reference otherwise (SGLBUDGET_ROUTING_BACKEND forces one)."""
    backend = os.environ.get("SGLBUDGET_ROUTING_BACKEND", "auto")
    if backend == "torch":
        return LayerRouter(ir, layer, conv)
    try:
        from ...kernels.backend import KernelRouter
    except ImportError:  # no triton in this environment
        return LayerRouter(ir, layer, conv)
    return KernelRouter(ir, layer, conv, backend)  # type: ignore[arg-type]


def _append_shared(weights: Tensor, ids: Tensor, topk_config, num_experts: int) -> tuple[Tensor, Tensor]:
    """The fused shared-expert columns SGLang's gate writes (ids E.., weight cancelling later scaling)."""
    from sglang.srt.layers.moe import topk as T

    n = topk_config.num_shared_topk_slots
    w = T.fused_shared_expert_weight(routed_scaling_factor=topk_config.routed_scaling_factor,
                                     fused_in_topk=T.is_routed_scaling_factor_fused_in_topk(topk_config))
    shared_ids = (num_experts + torch.arange(n, device=ids.device, dtype=ids.dtype)).expand(ids.shape[0], n)
    return (torch.cat([weights, weights.new_full((weights.shape[0], n), w)], dim=1),
            torch.cat([ids, shared_ids], dim=1))


def _runner_skips_minus_one(topk_config, ids: Tensor) -> bool:
    """CUDA runners take id -1 as 'no expert', and so does the CPU engine's native MoE path with sgl_budget's
    hook (:mod:`.native_moe`); CUDA's torch-native path, HIP and CPU AMX kernels need a real id."""
    if _topk_module()._is_hip:
        return False
    if ids.is_cuda:
        return not topk_config.torch_native
    return native_path_skips_minus_one()


_MODULES: dict = {}


def _topk_module():
    """``sglang.srt.layers.moe.topk`` (imported on first use: this module loads without SGLang)."""
    T = _MODULES.get("topk")
    if T is None:
        from sglang.srt.layers.moe import topk as T

        _MODULES["topk"] = T
    return T


def _pad_columns(ids: Tensor, weights: Tensor, k: int, width: int, num_experts: int,
                 minus_one: bool) -> tuple[Tensor, Tensor]:
    """SGLang's output at ``k`` routed slots (``[T, k + shared]``) widened to ``width`` routed slots: the padded
    slots (weight 0, id -1 where the runner skips -1, else a distinct expert the token does not use) go after the
    routed ones and before any fused shared-expert columns, as :func:`_standard_output` lays them out."""
    n = width - k
    if ids.shape[1] == k and minus_one:  # the common case: one constant pad each
        return F.pad(ids, (0, n), value=-1), F.pad(weights, (0, n))
    t = ids.shape[0]
    routed = F.pad(ids[:, :k], (0, n), value=-1)
    if not minus_one:  # a real id: rows SGLang masked (-1 / 0 in routed columns) keep what it wrote there
        valid = torch.arange(width, device=ids.device) < k
        filled = fill_padding(routed.clamp_min(0), valid.expand(t, width), num_experts)
        routed = torch.where(valid, routed, filled)
    if ids.shape[1] > k:  # fused shared-expert columns
        return (torch.cat([routed, ids[:, k:]], dim=1),
                torch.cat([weights[:, :k], weights.new_zeros(t, n), weights[:, k:]], dim=1))
    return routed, F.pad(weights, (0, n))


def _restore_padding(ids: Tensor, weights: Tensor, valid: Tensor, minus_one: bool) -> tuple[Tensor, Tensor]:
    """Zero the padded routed slots' weights again, and mark them -1 where the runner skips -1."""
    k = valid.shape[1]
    routed_w = weights[:, :k].masked_fill(~valid, 0.0)
    weights = torch.cat([routed_w, weights[:, k:]], dim=1) if weights.shape[1] > k else routed_w
    if minus_one:
        routed_ids = ids[:, :k].masked_fill(~valid, -1)
        ids = torch.cat([routed_ids, ids[:, k:]], dim=1) if ids.shape[1] > k else routed_ids
    return ids, weights
