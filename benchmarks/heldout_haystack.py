"""The held-out essay haystack of `memformer eval ruler`: the Debian Administrator's Handbook
(English HTML of the Debian package `debian-handbook`), as one text file in reading order.

The development split uses Python's documentation topics (the default `--haystack`); design
choices are made there. This text was never used while choosing, so RULER numbers on it (with
seeds never used either) are the held-out report.

    apt-get download debian-handbook
    python benchmarks/heldout_haystack.py debian-handbook_*.deb runs/haystacks/debian-handbook.txt
    memformer eval ruler --haystack runs/haystacks/debian-handbook.txt --seed 31337 ...

A second development haystack with numbered sections, as the handbook has, is its sister manual,
the Debian Reference (never used for a held-out number):

    apt-get download debian-reference-en
    python benchmarks/heldout_haystack.py debian-reference-en_*.deb runs/haystacks/debian-reference.txt \
        --html usr/share/debian-reference --index index.en.html
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from memformer.documents import read_document

HTML = "usr/share/doc/debian-handbook/html/en-US"


def reading_order(root: Path, index_name: str = "index.html") -> list[Path]:
    """The chapter and section pages in the order the index page's table of contents links them."""
    index = (root / index_name).read_text(encoding="utf-8")
    seen, pages = set(), []
    for name in re.findall(r'href="([^"#/]+\.html)', index):
        if name not in seen and (root / name).is_file():
            seen.add(name)
            pages.append(root / name)
    return pages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deb", help="debian-handbook_*.deb (apt-get download debian-handbook)")
    p.add_argument("out", help="text file to write")
    p.add_argument("--html", default=HTML, help="folder of the HTML pages inside the package")
    p.add_argument("--index", default="index.html", help="the page whose links give the reading order")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", args.deb, tmp], check=True)
        pages = reading_order(Path(tmp) / args.html, args.index)
        text = "\n\n".join(read_document(page) for page in pages)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {len(pages)} pages, {len(text.split())} words")


if __name__ == "__main__":
    main()
