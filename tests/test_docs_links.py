"""README.md and docs/*.md: every relative link resolves, every cited docs/results path exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a results path starts a token: not the tail of benchmarks/results/... or of another word
RESULTS = re.compile(r"(?<![\w./-])((?:docs/)?results/(?:\{[^{}\s]*\}|[^\s`'\"()\[\],;{])*)")
BRACES = re.compile(r"\{([^{}]*)\}")
CODE = re.compile(r"```.*?```|`[^`]*`", re.DOTALL)  # fenced blocks and code spans hold no links


def expand_braces(path: str) -> list[str]:
    """`a.{txt,json}` -> [`a.txt`, `a.json`], as the shell expands it."""
    match = BRACES.search(path)
    if not match:
        return [path]
    head, tail = path[:match.start()], path[match.end():]
    return [p for part in match.group(1).split(",") for p in expand_braces(head + part + tail)]


def dead_links(folder: Path, text: str) -> list[str]:
    """Markdown link targets into the repository (no URL, no bare anchor) that do not exist."""
    targets = [t.split("#", 1)[0] for t in LINK.findall(CODE.sub("", text))]
    local = [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    return [t for t in local if not (folder / t).exists()]


def cited_results(folder: Path, text: str) -> list[Path]:
    """Every docs/results path the text names, in a link or in running text, resolved.

    `docs/results/...` is read from the repository root; `results/...` from the page's folder,
    and only in docs/ (from the root it would mean a results/ folder that nothing uses).
    """
    found = []
    for token in RESULTS.findall(text):
        token = token.rstrip(".:")
        if token.startswith("docs/"):
            base = ROOT
        elif folder == ROOT / "docs":
            base = folder
        else:
            continue
        found += [(base / p).resolve() for p in expand_braces(token)]
    return found


def all_cited_results() -> set[Path]:
    """The docs/results paths cited anywhere in README.md and docs/*.md."""
    return {p for page in PAGES for p in cited_results(page.parent, page.read_text("utf-8"))}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path):
    dead = dead_links(page.parent, page.read_text(encoding="utf-8"))
    assert not dead, f"{page.name}: dead links {dead}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_cited_results_path_exists(page: Path):
    cited = cited_results(page.parent, page.read_text(encoding="utf-8"))
    missing = [str(p.relative_to(ROOT)) for p in cited if not p.exists()]
    assert not missing, f"{page.name}: cites missing {missing}"


def test_the_checks_catch_a_dead_link_and_a_missing_results_file():
    text = ("[gone](no-such-page.md) [ok](gpu.md#anchor) [web](https://example.org) [top](#x) "
            "`[code](not-a-link)` "
            "`docs/results/none-such.json`, results/codegen-census-2026-11-27.{txt,gone}.")
    docs = ROOT / "docs"
    assert dead_links(docs, text) == ["no-such-page.md"]
    missing = [p.relative_to(ROOT).as_posix() for p in cited_results(docs, text)
               if not p.exists()]
    assert missing == ["docs/results/none-such.json", "docs/results/codegen-census-2026-11-27.gone"]
    assert cited_results(ROOT, "results/x.json") == []  # README: only docs/results/... counts


def test_benchmark_output_folders_are_not_taken_for_docs_results():
    assert RESULTS.findall("writes benchmarks/results/device/device.json") == []
