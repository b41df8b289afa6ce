"""Calibration mode (``--moe-calibration``): requests that measure policies on the served model.

``sgl-budget eval|profile|tune --server URL`` need three things a normal request cannot ask for; a request
asks for them with ``custom_params: {"moe_calibration": {...}}``, which a server launched without
``--moe-calibration`` refuses with HTTP 400 (nothing is computed):

* ``"policy": TEXT`` — route with policy text sent in the request (an Alloc-L probe "layer 3 at k = 2", a
  ``tune`` candidate). It is compiled against the served model in the process that checks requests (a bad
  text is a 400 carrying every diagnostic) and again in each worker; it may name only data files the
  launch's own policies loaded (:mod:`sgl_budget.lang.inline`): a request never makes the server open a path.
* ``"group": {"id": ID, "rows": B, "lockstep": BOOL}`` — the B requests of one ``/generate`` call (equal
  length, no cached prefix) are the whole forward batch; with ``lockstep`` their prefill of B windows x L
  tokens is routed position by position as L decode steps of B tokens (phase ``decode``, batch B): exactly
  what B sequences decoded in lock-step with teacher forcing route, so decode-phase rules (SERE,
  piggybacking, Alloc-T, ``when decode``, ``batch`` conditions) are measured as decode.
* ``"report": true`` — the request's routing statistics come back in ``meta_info["sgl_budget"]``: routed
  expert slots and tokens, distinct experts per routed batch, the phase measured, and whether its group
  was routed as asked (a group the scheduler split is reported, never silently routed otherwise).
* ``"similarity": {"session": ID, "method": M, "positions": {"<layer>": [p, ...]}, "finish": BOOL}`` — SERE's
  expert similarity measured inside the workers (:mod:`.expert_similarity`): at each listed MoE layer the expert
  input of the request's tokens at window positions ``p`` runs through every expert with the layer's own weight
  shards, the outputs are summed over the tensor- / expert-parallel ranks and accumulated into the worker-side
  session ``ID``; a request with ``finish`` (and no positions) gets the session's per-layer ``[E, E]`` matrices
  back in its report (``"similarity"``) and ends the session. ``sgl-budget similarity --server`` sends these.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...lang.inline import compile_request_policy
from ...lang.ir import PolicyIR, RouteContext
from ...spec import ModelSpec

CALIBRATION_KEY = "moe_calibration"  # in custom_params
INFO_KEY = "sgl_budget"  # in meta_info: the request's report
ENV_CALIBRATION = "SGLBUDGET_MOE_CALIBRATION"  # "1": this launch serves calibration requests
ENV_FILES = "SGLBUDGET_CALIBRATION_FILES"  # JSON {name: absolute path}: files request policies may name
MAX_GROUP_ROWS = 4096
CALIB_ATTR = "_sgl_budget_calibration"  # set on a ForwardBatch that carries calibration requests
_FIELDS = {"policy", "group", "report", "similarity"}
_GROUP_FIELDS = {"id", "rows", "lockstep"}
_SIMILARITY_FIELDS = {"session", "method", "positions", "finish"}
SIMILARITY_METHODS = ("frobenius", "cosine", "cka")  # sgl_budget.similarity.METHODS
MAX_POSITIONS = 1 << 20  # positions one request may list over all its layers


class CalibrationRefused(ValueError):
    """A calibration request this server does not serve (SGLang answers a ValueError with HTTP 400)."""


@dataclass(frozen=True)
class Calibration:
    """What one request's ``moe_calibration`` field asks for."""

    policy: str | None = None  # policy text to route with
    group: str | None = None  # the id of its group (the B requests of one call)
    rows: int = 0  # B
    lockstep: bool = False  # route the group's prefill as decode steps of B tokens
    report: bool = False  # return routing statistics in meta_info["sgl_budget"]
    similarity: "SimilarityAsk | None" = None  # expert outputs to accumulate (sgl-budget similarity --server)


@dataclass(frozen=True)
class SimilarityAsk:
    """What one request's ``moe_calibration.similarity`` asks for (:mod:`.expert_similarity`)."""

    session: str
    method: str
    positions: dict  # MoE layer -> tuple of window positions whose expert input is measured
    finish: bool = False


def enabled() -> bool:
    return os.environ.get(ENV_CALIBRATION) == "1"


def allowed_files() -> dict[str, str]:
    raw = os.environ.get(ENV_FILES)
    return dict(json.loads(raw)) if raw else {}


def parse(value: Any) -> Calibration:
    """A ``moe_calibration`` value as a :class:`Calibration`; :class:`CalibrationRefused` says what is wrong."""
    if not isinstance(value, dict):
        raise CalibrationRefused(f"{CALIBRATION_KEY} must be an object with keys {sorted(_FIELDS)}")
    unknown = set(value) - _FIELDS
    if unknown:
        raise CalibrationRefused(f"{CALIBRATION_KEY}: unknown key(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    policy = value.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise CalibrationRefused(f"{CALIBRATION_KEY}.policy must be policy text (a string)")
    report = value.get("report", False)
    if not isinstance(report, bool):
        raise CalibrationRefused(f"{CALIBRATION_KEY}.report must be true or false")
    similarity = parse_similarity(value["similarity"]) if "similarity" in value else None
    group = value.get("group")
    if group is None:
        return Calibration(policy=policy, report=report, similarity=similarity)
    if not isinstance(group, dict) or set(group) - _GROUP_FIELDS or "id" not in group or "rows" not in group:
        raise CalibrationRefused(f'{CALIBRATION_KEY}.group must be {{"id": ID, "rows": B, "lockstep": BOOL}}')
    gid, rows, lockstep = group["id"], group["rows"], group.get("lockstep", False)
    if not isinstance(gid, str) or not gid or len(gid) > 128:
        raise CalibrationRefused(f"{CALIBRATION_KEY}.group.id must be a non-empty string (at most 128 characters)")
    if not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= MAX_GROUP_ROWS:
        raise CalibrationRefused(f"{CALIBRATION_KEY}.group.rows must be an integer in 1..{MAX_GROUP_ROWS}")
    if not isinstance(lockstep, bool):
        raise CalibrationRefused(f"{CALIBRATION_KEY}.group.lockstep must be true or false")
    return Calibration(policy=policy, group=gid, rows=rows, lockstep=lockstep, report=report, similarity=similarity)


def parse_similarity(value: Any) -> SimilarityAsk:
    """A ``moe_calibration.similarity`` value; :class:`CalibrationRefused` says what is wrong."""
    key = f"{CALIBRATION_KEY}.similarity"
    if not isinstance(value, dict) or set(value) - _SIMILARITY_FIELDS or "session" not in value:
        raise CalibrationRefused(f'{key} must be {{"session": ID, "method": M, "positions": {{"<layer>": '
                                 '[positions]}, "finish": BOOL}')
    session, method, finish = value["session"], value.get("method", "frobenius"), value.get("finish", False)
    if not isinstance(session, str) or not session or len(session) > 128:
        raise CalibrationRefused(f"{key}.session must be a non-empty string (at most 128 characters)")
    if method not in SIMILARITY_METHODS:
        raise CalibrationRefused(f"{key}.method must be one of {list(SIMILARITY_METHODS)}")
    if not isinstance(finish, bool):
        raise CalibrationRefused(f"{key}.finish must be true or false")
    raw = value.get("positions", {})
    if not isinstance(raw, dict):
        raise CalibrationRefused(f'{key}.positions must be an object {{"<MoE layer>": [window positions]}}')
    positions, total = {}, 0
    for layer, pos in raw.items():
        if not (isinstance(layer, str) and layer.isdigit()) or not isinstance(pos, list) \
                or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pos):
            raise CalibrationRefused(f"{key}.positions: each key must be a layer index (a string of digits) and "
                                     "each value a list of non-negative token positions")
        if len(set(pos)) != len(pos):
            raise CalibrationRefused(f"{key}.positions: layer {layer} lists a position twice")
        total += len(pos)
        if pos:
            positions[int(layer)] = tuple(pos)
    if total > MAX_POSITIONS:
        raise CalibrationRefused(f"{key}.positions: at most {MAX_POSITIONS} positions per request")
    if finish and positions:
        raise CalibrationRefused(f"{key}: a finishing request carries no positions (send it after the session's "
                                 "last windows came back)")
    return SimilarityAsk(session=session, method=method, positions=positions, finish=finish)


class PolicyCache:
    """Request policy text -> compiled IR (least recently used first out); a bad text raises its PolicyError."""

    def __init__(self, spec: ModelSpec, files: dict[str, str], size: int = 256) -> None:
        self.spec, self.files, self.size = spec, files, size
        self.irs: OrderedDict[str, PolicyIR] = OrderedDict()

    def get(self, text: str) -> PolicyIR:
        ir = self.irs.get(text)
        if ir is None:
            ir = compile_request_policy(text, self.spec, self.files)
            self.irs[text] = ir
            while len(self.irs) > self.size:
                self.irs.popitem(last=False)
        self.irs.move_to_end(text)
        return ir


_CHECK_CACHE: dict[str, PolicyCache] = {}


def check_request(custom_params, named: str | None) -> None:
    """In the process that checks requests: refuse a calibration field this launch does not serve (400)."""
    if not isinstance(custom_params, dict) or CALIBRATION_KEY not in custom_params:
        return
    if not enabled():
        raise CalibrationRefused(f"{CALIBRATION_KEY}: this server was launched without --moe-calibration, so it "
                                 "refuses calibration requests (relaunch with --moe-calibration to calibrate "
                                 "through it)")
    cal = parse(custom_params[CALIBRATION_KEY])
    if cal.similarity is not None:
        _check_similarity(cal.similarity)
    if cal.policy is not None:
        if named is not None:
            raise CalibrationRefused(f"give either moe_policy ({named!r}) or {CALIBRATION_KEY}.policy, not both")
        from ...errors import PolicyError
        from .settings import spec_from_env

        spec = spec_from_env()
        if spec is None:  # pragma: no cover - a calibration launch always exports its spec
            raise CalibrationRefused("this server has no model spec for request policies")
        cache = _CHECK_CACHE.setdefault("check", PolicyCache(spec, allowed_files()))
        try:
            cache.get(cal.policy)
        except PolicyError as e:
            raise CalibrationRefused(f"{CALIBRATION_KEY}.policy cannot be served:\n{e.format()}") from None


def _check_similarity(ask: SimilarityAsk) -> None:
    from .settings import spec_from_env

    spec = spec_from_env()
    if spec is None:  # pragma: no cover - a calibration launch always exports its spec
        return
    wrong = sorted(l for l in ask.positions if not spec.is_moe_layer(l))
    if wrong:
        raise CalibrationRefused(f"{CALIBRATION_KEY}.similarity.positions: layer(s) {wrong[:8]} are not MoE layers "
                                 f"of {spec.name} (MoE layers {list(spec.moe_layers)[:16]})")


def calibration_scope(custom_params) -> str | None:
    """The prefix-cache scope of a calibration request (what its routing depends on beyond the policy name):
    a digest of its policy text and lock-step flag; None for other requests."""
    import hashlib

    raw = custom_params.get(CALIBRATION_KEY) if isinstance(custom_params, dict) else None
    if raw is None:
        return None
    try:
        cal = parse(raw)
    except CalibrationRefused:
        return None
    text = f"{cal.policy or ''}\x00{cal.lockstep}\x00{cal.rows if cal.lockstep else 0}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def of_request(req) -> Calibration | None:
    """The calibration a worker's ``Req`` asks for (parsed once per request), or None."""
    got = getattr(req, "_sgl_budget_cal", False)
    if got is False:
        params = getattr(req.sampling_params, "custom_params", None)
        raw = params.get(CALIBRATION_KEY) if isinstance(params, dict) else None
        got = None
        if raw is not None:
            try:
                got = parse(raw)
            except CalibrationRefused:  # the request check refuses these; one that bypassed it routes as usual
                got = None
        req._sgl_budget_cal = got
    return got


@dataclass
class GroupPlan:
    """One group of a calibration forward: rows ``start .. start + rows * length`` of the forward's tokens."""

    start: int
    rows: int
    length: int
    lockstep: bool


@dataclass
class CalibrationBatch:
    """What a worker learnt, on the host, about a forward that carries calibration requests."""

    reqs: list  # the batch's requests, in token order
    lens: list[int]  # tokens of each request in this forward
    keys: list[str]  # each request's policy key: "named:<id>" or "text:<policy text>"
    irs: list[PolicyIR]  # each request's policy
    groups: list[GroupPlan]  # lock-step / grouped requests, routed group by group
    errors: dict[int, str] = field(default_factory=dict)  # request index -> why its group was not routed as asked
    phase: str = "prefill"
    reports: dict[int, dict] = field(default_factory=dict)  # request index -> its statistics (filled per layer)
    similarity: dict = field(default_factory=dict)  # MoE layer -> [(session, forward rows)] (.expert_similarity)
    expert_scales: dict = field(default_factory=dict)  # MoE layer -> Gemma 4's per-expert scale (similarity)

    @property
    def lockstep(self) -> bool:
        return bool(self.groups) and all(g.lockstep for g in self.groups) and not self.errors

    def context(self, ctx: RouteContext) -> RouteContext:
        if self.lockstep:
            b = self.groups[0].rows
            return RouteContext("decode", b, b)
        return ctx


def plan_batch(batch, pset, cache: PolicyCache) -> CalibrationBatch | None:
    """The calibration plan of a ScheduleBatch (None: no request in it asks for calibration)."""
    from .requests import requested_name

    reqs = list(batch.reqs or ())
    cals = [of_request(r) for r in reqs]
    if not any(c is not None for c in cals) or batch.forward_mode.is_idle():
        return None
    decode = batch.forward_mode.is_decode()
    lens = [1] * len(reqs) if decode else [int(n) for n in (batch.extend_lens or [])]
    prefix = [0] * len(reqs) if decode else [int(n) for n in (batch.prefix_lens or [0] * len(reqs))]
    keys, irs = [], []
    for r, c in zip(reqs, cals):
        if c is not None and c.policy is not None:
            keys.append("text:" + c.policy)
            irs.append(cache.get(c.policy))
        else:
            i = pset.index(requested_name(r.sampling_params.custom_params))
            keys.append(f"named:{i}")
            irs.append(pset.irs[i])
    out = CalibrationBatch(reqs=reqs, lens=lens, keys=keys, irs=irs, groups=[], phase="decode" if decode else
                           "prefill")
    _plan_groups(out, cals, prefix, decode)
    for i, (r, c) in enumerate(zip(reqs, cals)):
        if c is not None and c.report:
            out.reports[i] = _report_of(r, c)
            out.reports[i]["phase"] = "decode" if (decode or out.lockstep) else "prefill"
            out.reports[i]["lockstep"] = out.lockstep
            if i in out.errors:
                out.reports[i]["error"] = out.errors[i]
    if any(c is not None and c.similarity is not None for c in cals):
        from .expert_similarity import plan_similarity

        plan_similarity(out, cals, prefix, decode)
    return out


def _report_of(req, cal: Calibration) -> dict:
    """The request's report, created once and handed to SGLang's per-request output metadata right away (one
    value per output token: calibration requests generate one token, so ``meta_info["sgl_budget"]`` is
    ``[report]``); later layers and forwards update it in place before the output is sent."""
    rep = getattr(req, "_sgl_budget_report", None)
    if rep is None:
        rep = {"group": cal.group, "slots": 0, "tokens": 0, "distinct": 0, "batches": 0, "layers": 0}
        req._sgl_budget_report = rep
        if req.customized_info is None:
            req.customized_info = {}
        req.customized_info[INFO_KEY] = [rep]
    return rep


def _plan_groups(out: CalibrationBatch, cals: list, prefix: list[int], decode: bool) -> None:
    """Find each group's rows; a group that is not whole, contiguous, equal-length, prefix-free and alone with
    its own kind is an error for its requests (routed as an ordinary batch and reported)."""
    members: dict[str, list[int]] = {}
    for i, c in enumerate(cals):
        if c is not None and c.group is not None:
            members.setdefault(c.group, []).append(i)
    if not members:
        return
    starts = [0]
    for n in out.lens[:-1]:
        starts.append(starts[-1] + n)
    problems: dict[str, str] = {}
    for gid, idx in members.items():
        c = cals[idx[0]]
        lens = {out.lens[i] for i in idx}
        if len(idx) != c.rows:
            problems[gid] = (f"the scheduler ran {len(idx)} of the group's {c.rows} requests in this forward "
                             "(is the server busy with other requests, or is rows x length above its "
                             "--chunked-prefill-size?)")
        elif idx != list(range(idx[0], idx[0] + len(idx))):
            problems[gid] = "the group's requests are not contiguous in the forward batch"
        elif decode:
            problems[gid] = "the group reached a decode step: send it with max_new_tokens 0 or 1"
        elif len(lens) != 1:
            problems[gid] = f"the group's requests have different lengths in this forward ({sorted(lens)})"
        elif any(prefix[i] for i in idx):
            problems[gid] = ("part of the group's prompts came from the prefix cache (send return_logprob with "
                             "logprob_start_len 0, or flush the cache)")
        elif any(cals[i].rows != c.rows or cals[i].lockstep != c.lockstep for i in idx):
            problems[gid] = "the group's requests disagree on rows / lockstep"
        elif len({out.keys[i] for i in idx}) != 1:
            problems[gid] = "a lock-step group routes one policy: its requests name different ones"
        else:
            out.groups.append(GroupPlan(starts[idx[0]], len(idx), lens.pop(), c.lockstep))
    lock = {g.lockstep for g in out.groups}
    in_groups = sum(g.rows for g in out.groups)
    if out.groups and (len(lock) > 1 or (True in lock and in_groups != len(out.reqs))):
        why = "lock-step groups must be the whole forward batch (other requests ran in it)"
        for gid, idx in members.items():
            problems.setdefault(gid, why)
        out.groups = []
    for gid, why in problems.items():
        for i in members[gid]:
            out.errors[i] = why
    if problems:
        out.groups = []


def lockstep_view(x: Tensor, plan: CalibrationBatch) -> Tensor:
    """``[T, ...]`` rows of a lock-step forward as ``[G * L, B, ...]``: one decode batch per group and step."""
    parts = [x[g.start:g.start + g.rows * g.length].reshape(g.rows, g.length, *x.shape[1:]).transpose(0, 1)
             for g in plan.groups]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def lockstep_unview(y: Tensor, plan: CalibrationBatch) -> Tensor:
    """The inverse of :func:`lockstep_view`: ``[G * L, B, ...]`` back to the forward's ``[T, ...]`` rows."""
    out, at = [], 0
    for g in plan.groups:
        out.append(y[at:at + g.length].transpose(0, 1).reshape(g.rows * g.length, *y.shape[2:]))
        at += g.length
    return torch.cat(out) if len(out) > 1 else out[0]


def record_layer(plan: CalibrationBatch, ids: Tensor, num_experts: int) -> None:
    """Add one layer's routing (``ids`` ``[T, K]``, -1 = no expert) to the reports of the requests asking.

    Slots and tokens count each request's own rows. Distinct experts count per routed batch: per group and
    decode step in a lock-step group (its last position is left out: it only predicts past the window, and B
    sequences decoded in lock-step never route it), per group in a grouped prefill, else the whole forward.
    """
    if not plan.reports:
        return
    valid = (ids >= 0)
    per_row = valid.sum(-1).cpu()
    starts = [0]
    for n in plan.lens:
        starts.append(starts[-1] + n)
    group_of = {}
    for g in plan.groups:
        for r in range(g.rows):
            group_of[starts.index(g.start) + r] = g
    seen: dict[int, tuple[int, int]] = {}
    for i, rep in plan.reports.items():
        a, b = starts[i], starts[i + 1]
        g = group_of.get(i)
        if g is not None and g.lockstep:
            b -= 1  # the last position: see above
        rep["slots"] += int(per_row[a:b].sum())
        rep["tokens"] += b - a
        if g is None:
            key = -1
            if key not in seen:
                seen[key] = (_distinct(ids, valid), 1)
        else:
            key = g.start
            if key not in seen:
                sl = slice(g.start, g.start + g.rows * g.length)
                seen[key] = _group_distinct(ids[sl], valid[sl], g, num_experts)
        d, n = seen[key]
        rep["distinct"] += d
        rep["batches"] += n
        rep["layers"] += 1


def _distinct(ids: Tensor, valid: Tensor) -> int:
    return int(torch.unique(ids[valid]).numel())


def _group_distinct(ids: Tensor, valid: Tensor, g: GroupPlan, num_experts: int) -> tuple[int, int]:
    """(summed distinct experts, routed batches) of one group: per decode step (lock-step), or the group."""
    if not g.lockstep:
        return _distinct(ids, valid), 1
    steps = ids.reshape(g.rows, g.length, -1).transpose(0, 1)[:-1]  # [L - 1, B, K]
    ok = valid.reshape(g.rows, g.length, -1).transpose(0, 1)[:-1]
    seen = torch.zeros(steps.shape[0], num_experts + 1, dtype=torch.bool, device=ids.device)
    flat = torch.where(ok, steps, torch.full_like(steps, num_experts)).reshape(steps.shape[0], -1).long()
    seen.scatter_(1, flat, True)
    return int(seen[:, :num_experts].sum()), steps.shape[0]
