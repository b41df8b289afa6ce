"""What commands read, checked before anything heavy loads: model specs, budgets, policy mixes, bundled files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..spec import PRESETS, load_spec
from .errors import CliError

SPEC_HELP = f"model spec: a preset ({', '.join(PRESETS)}), a config.json, or a model directory"
EMBEDDED_TRACE = "brown-moe.test.trace.safetensors"
DEMO_TRACE = "deepseek-v2-lite.synthetic.trace.safetensors"
_CHECKOUT = Path(__file__).resolve().parents[2]


def spec(ref: str):
    """A :class:`~sgl_budget.spec.ModelSpec` from a preset name, a config.json or a model directory."""
    return load_spec(ref)


def budget_arg(text: str, top_k: int) -> float:
    """Parse ``50%`` (of top-k) or ``3.0`` (experts per token) into experts per token."""
    t = text.strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 < pct <= 100:
                raise CliError(f"budget {text!r} must lie in (0%, 100%]")
            return pct / 100.0 * top_k
        val = float(t)
    except ValueError:
        raise CliError(f"budget {text!r} is neither a percentage (50%) nor a number of experts (3.0)") from None
    if not 0 < val <= top_k:
        raise CliError(f"budget {text!r} must lie in (0, top_k={top_k}] experts per token")
    return val


def load_mixes(specs: Sequence[str] | None, model_spec=None) -> list:
    """``--mix`` values compiled against ``model_spec`` (a malformed one is a CliError; bad files a PolicyError);
    without a spec only their syntax is checked (before a model loads)."""
    from ..lang.mix import MixError, load_mix, parse_mix

    try:
        return [load_mix(text, model_spec) if model_spec is not None else parse_mix(text) for text in specs or ()]
    except MixError as e:
        raise CliError(f"--mix: {e}") from None


def require_policies_or_mixes(policies: Sequence, mix_specs: Sequence[str] | None) -> None:
    """``eval`` and ``replay`` need something to measure; a malformed ``--mix`` fails here, before any loading."""
    if not policies and not mix_specs:
        raise CliError("give at least one policy file or --mix")
    load_mixes(mix_specs)


MIX_HELP = ("a per-row policy mix, reported as one more row: PART[,PART...] with PART = [NAME=]POLICY[:FRACTION] or "
            "stock[:FRACTION] (stock: the model's own routing); each batch's rows are split between the parts in "
            "these shares (in order; parts without a share split what is left; shares sum to 1), e.g. "
            "--mix fast=policies/brown-moe/uniform-25.policy:0.5,stock:0.5; repeat for more mixes (docs/quality.md, "
            "Policy mixes)")


def bundled_dir() -> Path:
    """Directory of the bundled policies (installed package data, or the checkout's policies/)."""
    from importlib.resources import files

    return Path(str(files("sgl_budget.policies")))


def default_model_dir() -> Path:
    """The embedded default model (models/brown-moe in a checkout)."""
    return _CHECKOUT / "models" / "brown-moe"


def held_out_text() -> Path:
    """The held-out Brown Corpus text the embedded model never trained on (data/brown in a checkout)."""
    return _CHECKOUT / "data" / "brown" / "test.txt.xz"
