"""The pages in docs/ stay true to the code: docs/configuration.md is what scripts/gen_config_docs.py generates
now, every `cvae_exp/...py:name` and `tests/...::test_name` they cite exists, every relative link resolves, and
the math is written in the subset that GitHub renders. Pure file parsing (no JAX), so it runs in about a second."""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README = REPO / "README.md"

CODE_REF = re.compile(r"\b(cvae_exp/[\w/]+\.py):([A-Za-z_][\w.]*\w)")
TEST_REF = re.compile(r"\b(tests/[\w/]+\.py)::(\w+)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def page_ids(pages=PAGES) -> list[str]:
    return [p.name for p in pages]


@cache
def generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pages_exist():
    assert {"models.md", "math.md", "configuration.md"} <= {p.name for p in PAGES}


# ----------------------------------------------------------------------------- the generated page


def test_configuration_page_is_up_to_date():
    page, _ = generator().render()
    on_disk = (DOCS / "configuration.md").read_text()
    assert on_disk == page, "docs/configuration.md is out of date: run `make docs` (python scripts/gen_config_docs.py)"


def test_configuration_page_lists_every_schema_key_and_group_option():
    import dataclasses

    page, _ = generator().render()
    config = generator().load_config_module()
    groups = {
        f.name: f.default_factory()
        for f in dataclasses.fields(config.Config)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())
    }
    for name, node in groups.items():
        for f in dataclasses.fields(node):
            assert f"`{name}.{f.name}`" in page, f"{name}.{f.name} missing from docs/configuration.md"
    for f in dataclasses.fields(config.Config):
        if f.name not in groups:
            assert f"`{f.name}`" in page, f.name
    for option in sorted((REPO / "conf").glob("*/*.yaml")) + sorted((REPO / "conf" / "model").glob("*/*.yaml")):
        folder = option.parent.relative_to(REPO / "conf")
        assert f"[{option.name}](../conf/{folder}/{option.name})" in page, option
    for f in dataclasses.fields(config.ConvNetConfig):  # a nested group's keys (model/net=conv)
        assert f"`model.net.{f.name}`" in page, f.name


def test_generator_check_mode_exits_1_on_a_stale_page_and_0_after_writing(tmp_path):
    out = tmp_path / "configuration.md"
    out.write_text("stale\n")
    assert generator().main(["--check", "--output", str(out)]) == 1
    assert generator().main(["--output", str(out)]) == 0
    assert generator().main(["--check", "--output", str(out)]) == 0
    assert out.read_text() == generator().render()[0]


def test_field_comments_are_read_from_the_source():
    source = "class A:\n    a: int = 1  # the a\n    b: list = field(\n        default_factory=list\n    )  # the b\n    c: str = 'x'\n"
    assert generator().field_comments(source) == {"A": {"a": "the a", "b": "the b", "c": ""}}


def test_option_description_is_the_first_comment_line_run_on_to_its_sentence_end():
    header = generator().header_comment
    assert header("# @package _global_\n# One line. More\n# text.\nkey: 1\n") == "One line. More text."
    assert header("# Runs as:\n#   cvae-train x=1\n# More.\n") == "Runs as: `cvae-train x=1`"
    assert header("defaults: []\n# not a header\n") == ""


def test_table_cells_escape_pipes_and_markdown_outside_code():
    assert generator().md_text("a | b * c_d `x_y|z`") == r"a \| b \* c\_d `x_y\|z`"


# ----------------------------------------------------------------------------- references to code and tests


@cache
def defined_names(path: Path) -> set[str]:
    """Dotted names a reference may cite: module-level defs, classes, assignments; members of classes."""
    names: set[str] = set()

    def targets(stmt) -> list[str]:
        if isinstance(stmt, ast.Assign):
            return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and isinstance(stmt.target, ast.Name):
            return [stmt.target.id]
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return [stmt.name]
        return []

    def visit(body, prefix: str) -> None:
        for stmt in body:
            for name in targets(stmt):
                names.add(prefix + name)
            if isinstance(stmt, ast.ClassDef):
                visit(stmt.body, f"{prefix}{stmt.name}.")

    visit(ast.parse(path.read_text()).body, "")
    return names


def references(pattern: re.Pattern, pages=PAGES) -> list[tuple[str, str, str]]:
    return sorted({(p.name, m[1], m[2]) for p in pages for m in pattern.finditer(p.read_text())})


def test_the_math_and_model_pages_cite_code_and_tests():
    for name in ("math.md", "models.md"):
        page = [DOCS / name]
        assert len(references(CODE_REF, page)) >= 10, name
        assert len(references(TEST_REF, page)) >= 5, name


@pytest.mark.parametrize("page, file, name", references(CODE_REF))
def test_code_reference_exists(page, file, name):
    path = REPO / file
    assert path.is_file(), f"{page} cites {file}:{name}, but {file} does not exist"
    assert name in defined_names(path), f"{page} cites {file}:{name}, but {file} defines no {name}"


@pytest.mark.parametrize("page, file, name", references(TEST_REF))
def test_test_reference_exists(page, file, name):
    path = REPO / file
    assert path.is_file(), f"{page} cites {file}::{name}, but {file} does not exist"
    tests = {n.split(".")[-1] for n in defined_names(path)}
    assert name.startswith("test_") and name in tests, f"{page} cites {file}::{name}, which is not a test there"


# ----------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(pages=PAGES) -> list[tuple[str, str]]:
    out = set()
    for p in pages:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", p.read_text()))  # not links inside code
        out |= {(p.name, m[1]) for m in LINK.finditer(text)}
    return sorted(out)


@pytest.mark.parametrize(
    "page, target", [link for link in links([*PAGES, README]) if not re.match(r"[a-z]+:", link[1])]
)
def test_relative_link_resolves(page, target):
    """Every link of the README and of every docs page leads to a file that exists (and a heading there)."""
    home = REPO if page == README.name else DOCS
    file_part, _, anchor = target.partition("#")
    path = (home / file_part).resolve() if file_part else home / page
    assert path.exists(), f"{page} links to {target}, but {path} does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in anchors(path), f"{page} links to {target}, but {path.name} has no heading #{anchor}"


def test_every_docs_page_is_linked_from_the_readme():
    """The README is short; what moved out of it must stay reachable from it."""
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in links([README])}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


# ----------------------------------------------------------------------------- math that GitHub renders


def math_spans(text: str) -> list[str]:
    """Inline `$...$` spans and `$$` blocks of a page, outside code."""
    text = FENCE.sub("", text)
    blocks = re.findall(r"^\$\$\n(.*?)\n\$\$$", text, re.DOTALL | re.MULTILINE)
    text = re.sub(r"^\$\$\n.*?\n\$\$$", "", text, flags=re.DOTALL | re.MULTILINE)
    text = re.sub(r"`[^`\n]*`", "", text)
    return blocks + re.findall(r"\$([^$\n]+)\$", text)


@pytest.mark.parametrize("page", PAGES, ids=page_ids())
def test_math_is_delimited_as_github_expects(page):
    text = FENCE.sub("", page.read_text())
    in_block = False
    for i, line in enumerate(text.splitlines(), 1):
        if line == "$$":
            in_block = not in_block
            continue
        if in_block:
            assert "$" not in line, f"{page.name}:{i}: a `$` inside a $$ block"
            # Should Markdown read the line, a leading -, +, =, # or > would make it a list, heading or quote.
            assert not re.match(r"\s*[-+=#>]", line), f"{page.name}:{i}: a display line starting with {line[0]}"
            continue
        bare = re.sub(r"`[^`]*`", "", line)
        assert "$$" not in bare, f"{page.name}:{i}: display math must open and close with `$$` on lines of their own"
        assert bare.count("$") % 2 == 0, f"{page.name}:{i}: unbalanced inline `$` (inline math cannot span lines)"
        for m in re.finditer(r"\$([^$]+)\$", bare):
            before = bare[m.start() - 1] if m.start() else " "
            assert not (before.isalnum() or before == "-"), (
                f"{page.name}:{i}: GitHub ignores math right after {before!r}"
            )
            assert m[1] == m[1].strip(), f"{page.name}:{i}: inline math must not start or end with a space: {m[0]}"
    assert not in_block, f"{page.name}: a $$ block is never closed"


@pytest.mark.parametrize("page", PAGES, ids=page_ids())
def test_math_avoids_what_github_mishandles(page):
    for span in math_spans(page.read_text()):
        assert "‖" not in span and "\\|" not in span, f"{page.name}: use \\Vert or \\lVert, not ‖ or \\|: {span}"
        assert "\\begin{align" not in span, f"{page.name}: no align environments: {span}"
        assert not re.search(r"[<>*]", span), f"{page.name}: use \\lt, \\gt, \\ast in math: {span}"
        assert not re.search(r"\]\(", span), f"{page.name}: `](` in math reads as a Markdown link: {span}"
        # Markdown reads a backslash before punctuation as an escape and eats it before MathJax sees it
        # (\{ becomes {, \, becomes a comma): use \lbrace, \rbrace, and no \, \; \! \_ spacing or escapes.
        assert not re.search(r"\\[!-/:-@\[-`{-~]", span), f"{page.name}: math with a Markdown escape: {span}"
        # An underscore after punctuation or a space (`\mathbb{E}_q`, `)_`) can open Markdown emphasis that a later
        # `p_\theta` closes, eating the math between: write `\mathbb E_q`, `\mathrm{NCLL_{IS}}`, `...\nolimits_s`.
        assert not re.search(r"(^|[^A-Za-z0-9])_", span), f"{page.name}: an underscore that can open emphasis: {span}"


@pytest.mark.parametrize("page", PAGES, ids=page_ids())
def test_math_survives_markdown_untouched_and_tables_are_rectangular(page):
    # The worst case: a renderer that reads the math as plain CommonMark before MathJax sees it (GitHub did, and
    # partly still does). Every span must come out character for character, so escapes, emphasis and HTML are safe.
    import html

    markdown_it = pytest.importorskip("markdown_it")
    src = page.read_text()
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(src)
    text = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    for span in math_spans(src):
        assert span in text, f"{page.name}: Markdown changes this math: {span}"
    for table in re.findall(r"<table>.*?</table>", rendered, re.DOTALL):
        widths = {len(re.findall(r"<t[hd][ >]", row)) for row in re.findall(r"<tr>.*?</tr>", table, re.DOTALL)}
        assert len(widths) == 1, f"{page.name}: a table whose rows differ in width ({widths}); an unescaped `|`?"
