"""Every relative link of README.md, CONTRIBUTING.md and docs/*.md resolves: the file (or folder) it
names exists, and a `#fragment` names a heading of the target Markdown file (GitHub's anchors).
Links inside fenced code blocks and to other sites are not checked."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code blanked out (line numbers kept)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", "``", text)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats get -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path):
    """(line, target) of each relative link of a Markdown file."""
    text = without_code(path.read_text())
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        yield text[: m.start()].count("\n") + 1, target


def test_anchor_rules():
    text = "# A `b.py` (c, d)\n## Same\n## Same\n```\n# not a heading\n```\n"
    assert anchors(text) == {"a-bpy-c-d", "same", "same-1"}
    links = '[x](a.md) `[y](b.md)` ![z](c.png "t") [w](https://e.org)\n```\n[v](d.md)\n```\n'
    assert without_code(links).count("\n") == links.count("\n")
    assert LINK.findall(without_code(links)) == ["a.md", "c.png", "https://e.org"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    bad = []
    for line, target in relative_links(doc):
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            bad.append(f"{doc.name}:{line}: {target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
            bad.append(f"{doc.name}:{line}: {target}: no heading with that anchor")
    assert not bad, "\n".join(bad)
