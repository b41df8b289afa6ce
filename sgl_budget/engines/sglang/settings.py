"""What a launch asked of sgl_budget, how it reaches SGLang's worker processes, and launch-time validation.

SGLang starts its scheduler / TP / DP / EP workers with ``multiprocessing``
(spawn), so nothing patched in the launcher survives into them. The settings
travel in environment variables, which every spawned child inherits:

* ``SGLBUDGET_MOE_POLICY`` — absolute path of the default policy file;
* ``SGLBUDGET_MOE_NAMED_POLICIES`` — JSON ``[[name, absolute path], ...]`` of the policies a request
  may pick by name (``stock`` and ``default`` are always available);
* ``SGLBUDGET_POLICY_LOG_INTERVAL`` — seconds between the per-policy statistics log lines;
* ``SGLBUDGET_MOE_SPEC`` — the model spec the launcher validated against (JSON);
* ``SGLBUDGET_RECORD_DIR`` / ``SGLBUDGET_RECORD_MAX_TOKENS`` — router-logit recording
  (``SGLBUDGET_RECORD_ALL_RANKS=1``: every TP rank records, to check that ranks agree);
* ``SGLBUDGET_MOE_CALIBRATION`` / ``SGLBUDGET_CALIBRATION_FILES`` — calibration mode (``--moe-calibration``) and
  the data files request policies may name (:mod:`.calibration`).

The launcher validates the policy against the model's config before any worker
starts; workers compile it again (cheap) against the same spec.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import PolicyError  # noqa: F401  (re-exported: callers catch it from here)
from ...lang.limits import load_for_engine
from ...lang.ir import PolicyIR
from ...lang.policy_set import PolicySet, load_policy_set
from ...families import sglang_refusal
from ...lang.inline import launch_files
from ...spec import ModelSpec, SpecError
from .calibration import ENV_CALIBRATION, ENV_FILES

ENV_POLICY = "SGLBUDGET_MOE_POLICY"
ENV_NAMED = "SGLBUDGET_MOE_NAMED_POLICIES"
ENV_LOG_INTERVAL = "SGLBUDGET_POLICY_LOG_INTERVAL"
ENV_SPEC = "SGLBUDGET_MOE_SPEC"
ENV_RECORD_DIR = "SGLBUDGET_RECORD_DIR"
ENV_RECORD_MAX = "SGLBUDGET_RECORD_MAX_TOKENS"
ENV_RECORD_ALL_RANKS = "SGLBUDGET_RECORD_ALL_RANKS"  # "1": every TP rank records (to compare ranks), not rank 0 only
DEFAULT_RECORD_MAX_TOKENS = 65536
DEFAULT_LOG_INTERVAL = 30.0


@dataclass(frozen=True)
class Settings:
    """sgl_budget's part of a launch."""

    policy: str | None = None
    record_dir: str | None = None
    record_max_tokens: int = DEFAULT_RECORD_MAX_TOKENS
    named: tuple[tuple[str, str], ...] = ()  # (name, path) of the policies a request may pick
    log_interval: float = DEFAULT_LOG_INTERVAL
    calibration: bool = False  # --moe-calibration: serve calibration requests (sgl-budget eval/profile --server)

    @property
    def active(self) -> bool:
        return bool(self.policy or self.record_dir or self.named or self.calibration)

    @property
    def routes(self) -> bool:
        """A policy (default, named, or sent by calibration requests) routes some requests: the worker installs
        the routing hook."""
        return bool(self.policy or self.named or self.calibration)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(policy=os.environ.get(ENV_POLICY) or None, record_dir=os.environ.get(ENV_RECORD_DIR) or None,
                   record_max_tokens=int(os.environ.get(ENV_RECORD_MAX, DEFAULT_RECORD_MAX_TOKENS)),
                   named=named_from_env(), log_interval=float(os.environ.get(ENV_LOG_INTERVAL, DEFAULT_LOG_INTERVAL)),
                   calibration=os.environ.get(ENV_CALIBRATION) == "1")

    def export(self, spec: ModelSpec | None) -> None:
        """Publish to this process's environment, so every worker spawned from now on sees it."""
        for key, value in ((ENV_POLICY, self.policy), (ENV_RECORD_DIR, self.record_dir)):
            if value:
                os.environ[key] = str(Path(value).resolve())
            else:
                os.environ.pop(key, None)
        if self.named:
            os.environ[ENV_NAMED] = json.dumps([[n, str(Path(p).resolve())] for n, p in self.named])
        else:
            os.environ.pop(ENV_NAMED, None)
        os.environ[ENV_RECORD_MAX] = str(self.record_max_tokens)
        if self.calibration:
            os.environ[ENV_CALIBRATION] = "1"
            os.environ[ENV_FILES] = json.dumps(launch_files([p for p in (self.policy, *(p for _, p in self.named))
                                                              if p]))
        else:
            os.environ.pop(ENV_CALIBRATION, None)
            os.environ.pop(ENV_FILES, None)
        os.environ[ENV_LOG_INTERVAL] = str(self.log_interval)
        if spec is not None:
            os.environ[ENV_SPEC] = json.dumps(spec.to_dict())


def named_from_env() -> tuple[tuple[str, str], ...]:
    raw = os.environ.get(ENV_NAMED)
    return tuple((str(n), str(p)) for n, p in json.loads(raw)) if raw else ()


def request_names() -> tuple[str, ...]:
    """The policy names a request may give in this process's launch (read from the environment: the process
    that checks requests has no compiled :class:`PolicySet`)."""
    from ...lang.policy_set import request_names as names

    return names(n for n, _ in named_from_env())


def spec_from_env() -> ModelSpec | None:
    raw = os.environ.get(ENV_SPEC)
    return ModelSpec.from_dict(json.loads(raw)) if raw else None


def model_spec_for(model_path: str, trust_remote_code: bool = False, revision: str | None = None) -> ModelSpec:
    """The spec of the model SGLang will load (its ``config.json`` or AutoConfig); unsupported families are refused."""
    spec = _read_spec(model_path, trust_remote_code, revision)
    refusal = sglang_refusal(spec.model_type)  # the same function `sgl-budget check` asks
    if refusal:
        raise SpecError(f"{model_path}: {refusal}")
    return spec


def _read_spec(model_path: str, trust_remote_code: bool, revision: str | None) -> ModelSpec:
    p = Path(model_path)
    if p.is_dir() and (p / "config.json").is_file():
        return ModelSpec.from_hf_config(p / "config.json", name=p.name)
    try:
        from transformers import AutoConfig
    except ImportError as e:  # pragma: no cover - sglang depends on transformers
        raise SpecError(f"cannot read the config of {model_path!r}: {e}") from None
    try:
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as e:  # network, missing repo, bad config: all end the launch cleanly
        raise SpecError(f"cannot read the config of {model_path!r}: {e}") from None
    return ModelSpec.from_hf_config(cfg.to_dict(), name=str(model_path))


def validate(policy: str | Path, spec: ModelSpec, engine_top_k: int | None = None) -> PolicyIR:
    """Compile ``policy`` for ``spec`` and check what SGLang can run; raises :class:`PolicyError`.

    The engine rule lives in :mod:`sgl_budget.lang.limits`, shared with ``sgl-budget check``.
    """
    return load_for_engine(policy, spec, "sglang", engine_top_k)


def validate_set(settings: Settings, spec: ModelSpec) -> PolicySet:
    """Every policy of the launch (default, stock, named) compiled and checked; one PolicyError lists all problems."""
    return load_policy_set(spec, settings.policy, settings.named, loader=validate)
