"""Every relative link in the README and docs/ reaches a file, and every ``#anchor`` a
heading of it (GitHub's rule: lower case, punctuation but ``-`` and ``_`` dropped,
spaces to ``-``, ``-1``, ``-2`` ... for repeated headings)."""

import functools
import pathlib
import re

import pytest

pytestmark = pytest.mark.parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (code spans and links read as their text)."""
    text = heading.replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path: pathlib.Path) -> frozenset[str]:
    """The anchors of a Markdown file's headings (read once per file)."""
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6} (.*)", line)
        if match:
            base = slug(match.group(1))
            seen[base] = seen.get(base, -1) + 1
    return frozenset(
        base if n == 0 else f"{base}-{n}" for base, count in seen.items() for n in range(count + 1)
    )


def test_slug_follows_githubs_rule():
    assert slug("The ~1.5 ms overhead, hand-off by hand-off (2026-11-30, day)") == (
        "the-15-ms-overhead-hand-off-by-hand-off-2026-11-30-day"
    )
    assert slug("Overhead (`benchmarks/bench_monitor.py`)") == "overhead-benchmarksbench_monitorpy"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a URL scheme: not a file here
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.name}: broken links: {broken}"
