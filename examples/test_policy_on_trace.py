"""Example: unit-test policies on recorded router logits with the sgl_budget pytest plugin.

Run with ``pytest examples/``. The fixtures come from the plugin that
``pip install sgl-budget`` registers; swap the bundled trace for one recorded
from your own traffic (``sgl-budget record`` / ``--moe-record-trace``).
"""

from sgl_budget.testing import assert_mass_retained, assert_unique_reduction, assert_within_budget


def test_alloc_moe_stays_in_budget(load_trace, compile_policy, replay_policy):
    trace = load_trace()  # the bundled demo trace
    check = replay_policy(compile_policy("alloc-moe-half.policy", trace.spec), trace, batch_size=16)
    assert_within_budget(check)  # at most 50% of top-k activations per token, and each layer within its k
    assert check.activations_per_token <= 0.5 * trace.spec.top_k
    assert_mass_retained(check, at_least=0.6)  # mass retained: >= 60% of stock top-k's routing mass
    assert check.mass_retained <= 1.0 + 1e-9  # the replay table's "mass retained (of stock)" column


def test_sere_cuts_distinct_experts_per_decode_batch(load_trace, compile_policy, replay_policy):
    trace = load_trace()
    check = replay_policy(compile_policy("sere.policy", trace.spec), trace, batch_size=16)
    assert_unique_reduction(check, at_least=0.10)  # >= 10% fewer experts read per decode step
    assert check.est_decode_time_ratio < 1.0


def test_a_policy_written_inline(load_trace, compile_policy, replay_policy):
    trace = load_trace()
    ir = compile_policy('policy "decode-k4" { layers when decode { k = 4 } }', trace.spec)
    check = replay_policy(ir, trace, batch_size=8)
    assert abs(check.activations_per_token - 4.0) < 1e-9
