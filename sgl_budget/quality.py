"""What a quality measurement reports, whichever engine ran it (transformers in process, or an SGLang server)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EvalResult:
    """One policy (or full top-k / stock) on a set of text windows."""

    name: str
    perplexity: float
    accuracy: float  # top-1 next-token accuracy
    kl_to_full: float  # mean KL(full top-k || policy) of the next-token distributions (see ``kl_note``)
    activations_per_token: float  # real (non-padding) experts per token, mean over MoE layers
    unique_per_batch: float  # distinct experts per routed batch, mean over MoE layers
    tokens: int
    seconds: float
    budget: float | None = None  # the policy's budget in experts per token, if it has one
    mix: str | None = None  # a policy's share of a mix: the mix's label (its rows only; seconds: the whole mix)
    full_perplexity: float | None = None  # a share of a mix: full top-k's perplexity on the same rows
    agreement: float | None = None  # fraction of positions whose top-1 token equals full top-k's
    phase: str | None = None  # what was measured: decode (lock-step batches of B) or prefill
    kl_note: str | None = None  # how kl_to_full was computed, when it is not over the whole vocabulary

    def to_dict(self) -> dict:
        return asdict(self)
