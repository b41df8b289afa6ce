"""Rewrite README.md's model-family support matrix from sgl_budget.families (tests/test_families.py checks it)."""

from pathlib import Path

from sgl_budget.families import support_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- families:start -->\n", "<!-- families:end -->"

text = README.read_text(encoding="utf-8")
head, rest = text.split(START, 1)
README.write_text(head + START + support_markdown() + END + rest.split(END, 1)[1], encoding="utf-8")
print(f"{README}: support matrix rewritten")
