"""SGLang general plugin (entry point group ``sglang.srt.plugins``): ``--moe-policy`` on the stock launcher.

SGLang 0.5.23 calls ``sglang.srt.plugins.load_plugins()`` early in every process it
runs — the launcher (before it parses the command line), ``Engine.__init__``, and
each scheduler / DP-controller / detokenizer worker — and then applies the hooks
plugins registered with its ``HookRegistry``. :func:`register` is that plugin:

* always: adds the ``sgl-budget`` flags to SGLang's argument parser, captures them
  in ``ServerArgs.from_cli_args`` (validating the policy against the model before
  any worker starts) and lets ``sglang.Engine(..., moe_policy=...)`` take them;
* only in a process whose environment carries a policy or a recording request:
  hooks ``select_experts`` (routing) and ``TopK.bind_runner_backend`` (runner check).

Without sgl_budget flags nothing but the extra parser flags changes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .settings import DEFAULT_LOG_INTERVAL, DEFAULT_RECORD_MAX_TOKENS, ENV_RECORD_ALL_RANKS, Settings

log = logging.getLogger("sgl_budget")
_STATE: dict = {}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sgl-budget (expert-activation policies)")
    g.add_argument("--moe-policy", type=str, default=None, metavar="PATH",
                   help="Route MoE layers with this sgl_budget .policy file (checked against the model before "
                        "serving; see `sgl-budget explain`): the policy of requests that name none ('default').")
    g.add_argument("--moe-named-policy", action="append", default=None, metavar="NAME=PATH",
                   help="A policy requests may pick by name with sampling_params.custom_params "
                        '{"moe_policy": NAME} (repeatable). "stock" (the model\'s own routing) and "default" '
                        "are always available; an unknown name is refused with HTTP 400.")
    g.add_argument("--moe-policy-log-interval", type=float, default=DEFAULT_LOG_INTERVAL, metavar="SECONDS",
                   help="Log per-policy requests, tokens and experts/token every SECONDS (default %(default)s; "
                        "Prometheus series with --enable-metrics).")
    g.add_argument("--moe-record-trace", type=str, default=None, metavar="DIR",
                   help="Record router logits into sgl_budget trace files in DIR (for offline replay). "
                        "Decode steps replayed from CUDA graphs are not seen: disable CUDA graphs to record them.")
    g.add_argument("--moe-calibration", action="store_true", default=False,
                   help="Serve calibration requests (custom_params.moe_calibration: policy text sent in the request, "
                        "lock-step decode measurement of prefilled windows, routing statistics, expert similarity measured "
                        "in the workers), which sgl-budget eval/profile/tune/similarity --server send. Off by default: without it such requests get HTTP 400. "
                        "Request policies may name only files the launch's policies load.")
    g.add_argument("--moe-record-max-tokens", type=int, default=DEFAULT_RECORD_MAX_TOKENS, metavar="N",
                   help="Stop recording after N tokens per worker (bounds the trace size).")


def settings_from_namespace(args: argparse.Namespace) -> Settings:
    return Settings(policy=getattr(args, "moe_policy", None), record_dir=getattr(args, "moe_record_trace", None),
                    record_max_tokens=getattr(args, "moe_record_max_tokens", DEFAULT_RECORD_MAX_TOKENS),
                    named=named_policies(getattr(args, "moe_named_policy", None)),
                    log_interval=getattr(args, "moe_policy_log_interval", DEFAULT_LOG_INTERVAL),
                    calibration=bool(getattr(args, "moe_calibration", False)))


def named_policies(value) -> tuple[tuple[str, str], ...]:
    """``--moe-named-policy`` values, or ``Engine(moe_named_policies=...)``: a dict, or NAME=PATH strings."""
    from ...lang.policy_set import parse_named

    if not value:
        return ()
    if isinstance(value, dict):
        return tuple((str(k), str(v)) for k, v in value.items())
    if isinstance(value, str):
        value = [value]
    return tuple(parse_named(v) if isinstance(v, str) else (str(v[0]), str(v[1])) for v in value)


def per_request_blocker(server_args) -> str | None:
    """Why requests cannot carry their own policy in this launch (their tokens do not map to batch rows)."""
    if getattr(server_args, "speculative_algorithm", None):
        return "speculative decoding (--speculative-algorithm) forwards draft tokens that are not batch rows"
    if getattr(server_args, "enable_dp_attention", False):
        return "with --enable-dp-attention the MoE layers see tokens gathered from other data-parallel ranks"
    return None


def apply_settings(settings: Settings, model_path: str | None, trust_remote_code: bool = False,
                   revision: str | None = None, exit_on_error: bool = True, server_args=None):
    """Validate ``settings`` against the model and publish them for the workers; returns the PolicySet (or None).

    A bad policy ends a CLI launch with the compiler-style message and exit status 2
    (``exit_on_error``); the Python API raises the PolicyError instead.
    """
    from ...errors import PolicyError
    from ...spec import SpecError
    from .requests import ENV_PER_REQUEST_OFF
    from .settings import model_spec_for, validate_set

    spec = pset = None
    blocker = per_request_blocker(server_args)
    try:
        if not settings.log_interval > 0:
            raise SpecError(f"--moe-policy-log-interval must be a positive number of seconds, not "
                            f"{settings.log_interval}")
        if settings.named and blocker:
            raise SpecError(f"--moe-named-policy: per-request policies cannot be served here: {blocker}")
        if settings.calibration and blocker:
            raise SpecError(f"--moe-calibration: calibration requests cannot be served here: {blocker}")
        if settings.active:
            if not model_path:
                raise SpecError("--moe-policy / --moe-named-policy / --moe-record-trace need --model-path")
            spec = model_spec_for(model_path, trust_remote_code, revision)
        if settings.routes:
            pset = validate_set(settings, spec)
    except (PolicyError, SpecError) as e:
        if not exit_on_error:
            raise
        text = e.format() if isinstance(e, PolicyError) else f"error: {e}"
        print(f"sgl-budget: the MoE policy cannot be served\n{text}", file=sys.stderr)
        raise SystemExit(2) from None
    settings.export(spec)
    if blocker:
        os.environ[ENV_PER_REQUEST_OFF] = blocker
    else:
        os.environ.pop(ENV_PER_REQUEST_OFF, None)
    if pset is not None:
        log.info("sgl_budget: MoE policies validated for %s (%d MoE layers): %s", spec.name, spec.num_moe_layers,
                 pset.describe())
    return pset


def _add_cli_args_hook(original, parser, *args, **kwargs):
    result = original(parser, *args, **kwargs)
    add_cli_args(parser)
    return result


CPU_ARGS = ("device", "max_total_tokens", "sleep_on_idle", "tp_size", "dp_size", "pp_size", "speculative_algorithm",
            "enable_hierarchical_cache")


def before_server_args(model_path: str | None, args: dict, exit_on_error: bool = True) -> dict:
    """Launch-time work that must happen before SGLang resolves its arguments (both entry points).

    Warns about a checkpoint SGLang would mis-load, and prepares CPU serving for ``--device cpu``
    (:mod:`.cpu`) from ``args`` (the :data:`CPU_ARGS` values given); returns server-argument values to use
    instead of the defaults.
    """
    from .checkpoint import untied_head_problem
    from .cpu import prepare

    problem = untied_head_problem(model_path)
    if problem:  # once: through logging where SGLang configured it, else on stderr
        if log.hasHandlers():
            log.warning("sgl_budget: %s", problem)
        else:
            print(f"sgl_budget: warning: {problem}", file=sys.stderr)
    state = prepare(args)
    if state.refused:
        text = "\n".join(f"error: {r}" for r in state.refused)
        if not exit_on_error:
            raise RuntimeError(f"sgl_budget CPU serving:\n{text}")
        print(f"sgl-budget: this launch cannot run on CPU here\n{text}", file=sys.stderr)
        raise SystemExit(2)
    return state.overrides


def before_from_cli_args(args: argparse.Namespace) -> None:
    """Before ``ServerArgs.from_cli_args`` builds its record (the plugin's hook and the fork series alike):
    checkpoint warnings and the CPU-serving values (:func:`before_server_args`) written into ``args``."""
    overrides = before_server_args(getattr(args, "model_path", None), {k: getattr(args, k, None) for k in CPU_ARGS})
    for name, value in overrides.items():
        setattr(args, name, value)


def after_from_cli_args(args: argparse.Namespace, server_args) -> None:
    """After it: every policy of the launch validated against the model and published, before any worker starts."""
    settings = settings_from_namespace(args)
    if not settings.active:
        return
    pset = apply_settings(settings, getattr(args, "model_path", None), bool(getattr(args, "trust_remote_code", False)),
                          getattr(args, "revision", None), server_args=server_args)
    if pset is not None:  # the launcher's HTTP app lists what requests may pick
        from .listing import add_listing_route, policy_listing

        add_listing_route(policy_listing(pset, per_request_blocker(server_args), calibration=settings.calibration))


def _from_cli_args_hook(original, cls, args, *rest, **kwargs):
    before_from_cli_args(args)
    server_args = original(cls, args, *rest, **kwargs)
    after_from_cli_args(args, server_args)
    return server_args


def build_server_args(**kwargs):
    """``ServerArgs(**kwargs)`` that also takes ``moe_policy``, ``moe_named_policies`` (``{name: path}``),
    ``moe_policy_log_interval``, ``moe_record_trace`` and ``moe_record_max_tokens``.

    SGLang's ``ServerArgs`` is a sealed msgspec record that cannot grow fields from
    outside, so ``Engine`` builds its record through this function (installed as
    ``Engine.server_args_class``); the sgl_budget keys are validated and published.
    """
    from sglang.srt.server_args import ServerArgs

    settings = Settings(policy=kwargs.pop("moe_policy", None), record_dir=kwargs.pop("moe_record_trace", None),
                        record_max_tokens=kwargs.pop("moe_record_max_tokens", DEFAULT_RECORD_MAX_TOKENS),
                        named=named_policies(kwargs.pop("moe_named_policies", None)),
                        log_interval=kwargs.pop("moe_policy_log_interval", DEFAULT_LOG_INTERVAL),
                        calibration=bool(kwargs.pop("moe_calibration", False)))
    kwargs.update(before_server_args(kwargs.get("model_path"), {k: kwargs.get(k) for k in CPU_ARGS},
                                     exit_on_error=False))
    server_args = ServerArgs(**kwargs)
    if settings.active:
        apply_settings(settings, kwargs.get("model_path"), bool(kwargs.get("trust_remote_code", False)),
                       kwargs.get("revision"), exit_on_error=False, server_args=server_args)
    return server_args


def _bind_runner_backend_hook(original, self, runner_backend, *args, **kwargs):
    result = original(self, runner_backend, *args, **kwargs)
    from sglang.srt.layers.moe.topk import TopKOutputFormat

    fmt = self.topk_config.output_format
    wanted = _STATE.get("pending") or _STATE.get("settings")
    if wanted is not None and wanted.routes and fmt not in (None, TopKOutputFormat.STANDARD):
        runner = getattr(runner_backend, "value", runner_backend)  # the --moe-runner-backend name
        raise RuntimeError(
            f"sgl_budget: --moe-policy needs a MoE runner that consumes standard top-k output; layer "
            f"{self.layer_id} uses the {runner} runner with {TopKOutputFormat(fmt).name} routing (routing fused into "
            "the MoE kernel). Choose e.g. --moe-runner-backend triton.")
    return result


def _activate_pending() -> None:
    pending = _STATE.pop("pending", None)
    if pending is not None:
        activate(pending)


def _init_new_hook(original, cls, batch, *args, **kwargs):
    """Around ``ForwardBatch.init_new``: the new batch's row -> policy map, before its forward runs."""
    forward_batch = original(cls, batch, *args, **kwargs)
    _activate_pending()
    routing = _STATE.get("routing")
    if routing is not None and getattr(batch, "reqs", None) is not None:
        routing.on_forward_batch(batch, forward_batch)
    return forward_batch


BATCH_ATTRS = ("_sgl_budget_rows", "_sgl_budget_calibration")  # requests.ROWS_ATTR, calibration.CALIB_ATTR


def _load_batch_hook(original, self, forward_batch, *args, **kwargs):
    """Around a model runner's ``load_batch``: SGLang 0.5.23 copies the live ForwardBatch into its runner's static
    buffers and runs the copy, so what :func:`_init_new_hook` noted on the live batch moves to the copy."""
    out = original(self, forward_batch, *args, **kwargs)
    if out is not None and out is not forward_batch:
        for attr in BATCH_ATTRS:
            value = getattr(forward_batch, attr, None)
            if value is not None:
                setattr(out, attr, value)
    return out


def _req_init_hook(original, self, *args, **kwargs):
    """Around ``Req.__init__``: a request's policy scopes its prefix-cache entries (see :func:`.requests.cache_key`)."""
    original(self, *args, **kwargs)
    _activate_pending()
    routing = _STATE.get("routing")
    if routing is not None:
        from .requests import cache_key

        self.extra_key = cache_key(self.extra_key, self.sampling_params.custom_params, routing.pset)


def _select_experts_hook(original, hidden_states, router_logits, topk_config, **kwargs):
    _activate_pending()
    recorder = _STATE.get("recorder")
    if recorder is not None:
        recorder.observe(kwargs.get("layer_id"), router_logits, kwargs.get("num_token_non_padded"),
                         topk_config.correction_bias)
    routing = _STATE.get("routing")
    if routing is None:
        return original(hidden_states, router_logits, topk_config, **kwargs)
    return routing.select_experts(original, hidden_states, router_logits, topk_config, **kwargs)


def activate(settings: Settings) -> None:
    """Build this worker's routing / recording state from ``settings`` (idempotent)."""
    from ...lang.policy_set import load_policy_set
    from .record import Recorder
    from .routing import PolicyRouting
    from .settings import model_spec_for, spec_from_env
    from .stats import PolicyStats

    if _STATE.get("settings") == settings:
        return
    spec = spec_from_env()
    if spec is None and settings.active:
        from sglang.srt.runtime_context import get_server_args

        spec = model_spec_for(get_server_args().model_path)
    _STATE["settings"] = settings
    routing = None
    if settings.routes:
        pset = load_policy_set(spec, settings.policy, settings.named)
        routing = PolicyRouting(pset, stats=PolicyStats(pset, settings.log_interval, report=_reports()))
        if settings.calibration:
            from .calibration import PolicyCache, allowed_files

            routing.calibration = PolicyCache(spec, allowed_files())
        log.info("sgl_budget: routing with %s", pset.describe())
    _STATE["routing"] = routing
    _STATE["recorder"] = Recorder(settings.record_dir, spec, settings.record_max_tokens,
                                  rank0_only=os.environ.get(ENV_RECORD_ALL_RANKS) != "1") if settings.record_dir \
        else None


def _reports() -> bool:
    """Rank 0 of the tensor-parallel group logs and exports the statistics (every rank counts the same batches)."""
    try:
        from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # not initialised (tests): this process reports
        return True


def _register_request_hooks(settings: Settings) -> None:
    """Per-request policy choice: the request check everywhere, the row map in workers of a routing launch."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .requests import verify_hook

    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify", verify_hook, HookType.AROUND)
    if settings.routes:
        HookRegistry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", _init_new_hook,
                              HookType.AROUND)
        HookRegistry.register("sglang.srt.managers.schedule_batch.Req.__init__", _req_init_hook, HookType.AROUND)
        for runner in ("eager_runner.EagerRunner", "decode_cuda_graph_runner.DecodeCudaGraphRunner",
                       "prefill_cuda_graph_runner.PrefillCudaGraphRunner"):
            HookRegistry.register(f"sglang.srt.model_executor.runner.{runner}.load_batch", _load_batch_hook,
                                  HookType.AROUND)


def install_fork_hook() -> None:
    """Worker side of the patch series (``patches/``): in a worker of a launch that asked for a policy (default
    or named) or a recording, install the routing hook via ``set_select_experts_hook``."""
    topk = sys.modules["sglang.srt.layers.moe.topk"]  # called while that module finishes importing
    settings = Settings.from_env()
    if settings.active:
        _STATE["pending"] = settings
        topk.set_select_experts_hook(_select_experts_hook)


def _topk_has_hook_point() -> bool:
    """Whether this SGLang's ``select_experts`` is the patch series' dispatcher (0002), which routes through
    ``set_select_experts_hook``: wrapping it as well would run sgl_budget's routing hook twice."""
    import sglang.srt.layers.moe.topk as topk

    return hasattr(topk, "set_select_experts_hook")


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register sgl_budget's hooks with SGLang's HookRegistry.

    In a fork with the patch series (``SGL_BUDGET_PATCHED``) the series already calls into sgl_budget for the
    launcher's flags, their validation and the routing hook; everything else (``Engine`` keywords, per-request
    choice, CPU serving, the runner check) is registered here in both builds.
    """
    import sglang.srt.server_args as server_args_module
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    settings = Settings.from_env()
    patched = getattr(server_args_module, "SGL_BUDGET_PATCHED", False)
    _register_request_hooks(settings)
    if not patched:
        HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args_hook, HookType.AROUND)
        HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args_hook,
                              HookType.AROUND)
    engine = sys.modules.get("sglang.srt.entrypoints.engine")
    if engine is not None and engine.Engine.__dict__.get("server_args_class") is not None:
        engine.Engine.server_args_class = staticmethod(build_server_args)
    from .cpu import register_worker_hooks

    register_worker_hooks()
    if settings.active:  # a worker of a launch that asked for a policy or a recording
        if not (patched or _topk_has_hook_point()):  # (a fork's topk.py installs it itself: install_fork_hook)
            HookRegistry.register("sglang.srt.layers.moe.topk.select_experts", _select_experts_hook,
                                  HookType.AROUND)
            _STATE["pending"] = settings  # compiled on the first routed forward (a warmup, before graph capture)
        HookRegistry.register("sglang.srt.layers.moe.topk.TopK.bind_runner_backend", _bind_runner_backend_hook,
                              HookType.AROUND)
        from . import native_moe

        native_moe.register()
        if settings.calibration:  # sgl-budget similarity --server: expert outputs measured in the workers
            from . import expert_similarity

            expert_similarity.register()
