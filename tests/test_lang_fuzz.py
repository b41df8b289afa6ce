"""Mutated valid policies: whatever the mutation, only PolicyError may escape the compiler."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_budget.errors import PolicyError
from sgl_budget.lang import compile_policy
from sgl_budget.spec import PRESETS

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
SOURCES = [p.read_text() for p in sorted(POLICY_DIR.glob("*.policy"))]
SPEC = PRESETS["deepseek-v2-lite"]
TOKEN = re.compile(r'"[^"\n]*"|[A-Za-z_]+|\d+(?:\.\d+)?%?|\.\.|>=|<=|==|[{}:;,=<>#\n]|\s+|.')
VOCAB = ["policy", "budget", "layers", "tokens", "reroute", "piggyback", "when", "and", "decode", "prefill",
         "batch", "k", "=", ">=", "<=", "layer", "..", ",", ":", "{", "}", ";", "allocate", "dp", "uniform",
         "from", "min_k", "max_k", "reallocate", "by", "score", "similarity", "primary", "top", "coverage",
         "count", "keep", "preserve", "critical", "min_similarity", "min_score", "0", "1", "6", "7", "-1",
         "1e9", "0.5", "150%", "50%", "0%", '"x"', '""', '"profiles/deepseek-v2-lite.synthetic.sens.yaml"',
         "#", "\n", " ", "\x00", "é", "\t"]
CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))


def compile_or_policy_error(text: str) -> None:
    try:
        compile_policy(text, SPEC, file="fuzz.policy", base_dir=POLICY_DIR)
    except PolicyError as e:
        out = e.format()  # formatting must work for every error
        assert out.startswith("fuzz.policy")


def test_sources_compile() -> None:
    for src in SOURCES:
        compile_policy(src, SPEC, file="ok.policy", base_dir=POLICY_DIR)


@st.composite
def char_mutation(draw) -> str:
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        c = draw(CHARS)
        if op == "insert":
            text = text[:i] + c + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + c + text[i + 1:]
    return text


@st.composite
def token_mutation(draw) -> str:
    toks = TOKEN.findall(draw(st.sampled_from(SOURCES)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(["insert", "delete", "replace", "swap"]))
        t = draw(st.sampled_from(VOCAB))
        if op == "insert":
            toks.insert(i, t)
        elif op == "delete":
            del toks[i]
        elif op == "replace":
            toks[i] = t
        elif i + 1 < len(toks):
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
    return "".join(toks)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(char_mutation())
def test_character_mutations_raise_only_policy_error(text: str) -> None:
    compile_or_policy_error(text)


@FUZZ
@given(token_mutation())
def test_token_mutations_raise_only_policy_error(text: str) -> None:
    compile_or_policy_error(text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(VOCAB), max_size=40).map(" ".join))
def test_random_token_soup(text: str) -> None:
    compile_or_policy_error('policy "soup" {' + text + "}")
