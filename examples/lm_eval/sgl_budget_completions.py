"""lm-evaluation-harness model ``sgl-budget-completions``: lm_eval's ``local-completions`` (the OpenAI
/v1/completions API) plus one model argument, ``moe_policy=NAME``, sent as ``custom_params: {"moe_policy": NAME}``
in the body of every request (loglikelihood, rolling loglikelihood / perplexity, generation), so one SGLang server
launched with ``--moe-named-policy NAME=PATH`` serves each evaluation with the policy it names.

Why a model class: ``local-completions`` builds its loglikelihood requests from a fixed set of fields (model,
prompt, temperature, max_tokens, logprobs, seed, echo), and no model argument adds body fields; only generation
requests take extra ones (``--gen_kwargs '{"custom_params": {"moe_policy": "NAME"}}'`` works for those with the
stock model). Overriding ``_create_payload`` is how lm_eval's API guide extends an API model.

Run it as the ``lm_eval`` command (same arguments; this file only registers the model first)::

    python examples/lm_eval/sgl_budget_completions.py run --model sgl-budget-completions \
        --model_args model=models/brown-moe,base_url=http://127.0.0.1:30000/v1/completions,moe_policy=fast ...

or from Python: ``import sgl_budget_completions`` (with this directory on ``sys.path``), then
``lm_eval.simple_evaluate(model="sgl-budget-completions", model_args={..., "moe_policy": "fast"})``.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI


@register_model("sgl-budget-completions")
class PolicyCompletionsAPI(LocalCompletionsAPI):
    def __init__(self, moe_policy=None, **kwargs):
        super().__init__(**kwargs)
        # lm_eval turns model_args values that look like numbers into numbers; a policy name is a string
        self.moe_policy = None if moe_policy is None else str(moe_policy)

    def _create_payload(self, *args, **kwargs) -> dict:
        payload = super()._create_payload(*args, **kwargs)
        if self.moe_policy is not None:
            payload["custom_params"] = {**(payload.get("custom_params") or {}), "moe_policy": self.moe_policy}
        return payload


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
