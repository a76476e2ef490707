"""The documentation against the code: every TMSConfig field documented with its real default, no broken links."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
import textwrap
import types
from pathlib import Path
from urllib.parse import unquote

import pytest
import trl

from trl_tms import TMSConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_PAGE = DOCS / "configuration.md"

_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


# Markdown helpers


def _cells(line: str) -> list[str]:
    """The cells of a table row, with `\\|` (a pipe inside a cell, as GitHub Markdown needs it) unescaped."""
    parts = _CELL_SPLIT.split(line.strip())
    if parts and parts[0] == "":
        parts = parts[1:]
    if parts and parts[-1] == "":
        parts = parts[:-1]
    return [part.strip().replace("\\|", "|") for part in parts]


def _code(cell: str) -> str | None:
    """The content of the first code span in a cell, or None."""
    match = _CODE_SPAN.search(cell)
    return match.group(2).strip() if match else None


def table_rows(markdown: str) -> list[dict[str, str]]:
    """Every body row of every table, as {lower-cased header: cell}."""
    lines = markdown.splitlines()
    rows, header = [], None
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            header = None
            continue
        if _SEPARATOR.match(line.strip()):
            continue
        if header is None:
            if i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip()):
                header = [cell.lower() for cell in _cells(line)]
            continue
        rows.append(dict(zip(header, _cells(line))))
    return rows


def _type_name(annotation) -> str:
    if annotation is type(None):
        return "None"
    # Checked before `type`: `isinstance(str | None, type)` is True on Python 3.11.
    if isinstance(annotation, types.UnionType):
        return " | ".join(_type_name(arg) for arg in annotation.__args__)
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def tms_fields() -> list[dataclasses.Field]:
    inherited = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    return [f for f in dataclasses.fields(TMSConfig) if f.name not in inherited]


def config_doc_problems(markdown: str, fields: list[dataclasses.Field]) -> list[str]:
    """What is wrong with the field tables of the configuration page (an empty list when nothing is)."""
    documented = {}
    for row in table_rows(markdown):
        if "default" not in row:
            continue
        name = _code(row.get("field", ""))
        if name is None:
            continue
        if name in documented:
            return [f"`{name}` is documented twice"]
        documented[name] = row
    problems = []
    known = {f.name for f in fields}
    for name in sorted(set(documented) - known):
        problems.append(f"`{name}` is documented as a TMSConfig field but TMSConfig adds no such field")
    for f in fields:
        row = documented.get(f.name)
        if row is None:
            problems.append(f"`{f.name}` has no row in a field table of docs/configuration.md")
            continue
        literal = _code(row["default"])
        try:
            value = ast.literal_eval(literal) if literal is not None else None
        except (ValueError, SyntaxError):
            problems.append(f"`{f.name}`: documented default {row['default']!r} is not a Python literal in backticks")
            continue
        if literal is None or type(value) is not type(f.default) or value != f.default:
            problems.append(f"`{f.name}`: documented default {row['default']!r}, real default {f.default!r}")
        # The annotation, not `f.type`: HfArgumentParser (the CLI's parser) rewrites `f.type` in place.
        real = _type_name(TMSConfig.__annotations__[f.name])
        if "type" in row and _code(row["type"]) != real:
            problems.append(f"`{f.name}`: documented type {row['type']!r}, real type `{real}`")
    return problems


_FENCE = re.compile(r"^([ \t]*)(```|~~~).*?^\1\2[ \t]*$", re.S | re.M)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def link_targets(markdown: str) -> list[str]:
    """Targets of the inline and reference links (and images) outside code blocks and code spans."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    return _INLINE_LINK.findall(text) + _REFERENCE.findall(text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    slugs, seen = set(), {}
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", markdown), re.M):
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def broken_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file, or whose anchor in a Markdown file, does not exist."""
    problems = []
    for target in link_targets(path.read_text(encoding="utf-8")):
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, fragment = target.partition("#")
        file_part = unquote(file_part.split("?")[0])
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target} -> no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination.read_text("utf-8")):
            problems.append(f"{path.relative_to(ROOT)}: {target} -> no heading #{fragment} in {destination.name}")
    return problems


def markdown_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


# The tests


def test_every_tms_config_field_is_documented_with_its_default():
    fields = tms_fields()
    assert len(fields) >= 10, "TMSConfig should add its own fields on top of SFTConfig"
    problems = config_doc_problems(CONFIG_PAGE.read_text(encoding="utf-8"), fields)
    assert not problems, "docs/configuration.md is out of date:\n" + "\n".join(problems)


def test_config_check_catches_a_missing_field_and_a_wrong_default():
    fields = tms_fields()
    good = CONFIG_PAGE.read_text(encoding="utf-8")
    assert config_doc_problems(good, fields) == []
    row = next(line for line in good.splitlines() if line.startswith("| `temperature` |"))
    wrong_default = good.replace(row, row.replace("`1.0`", "`0.5`", 1))
    assert any("temperature" in p for p in config_doc_problems(wrong_default, fields))
    int_for_float = good.replace(row, row.replace("`1.0`", "`1`", 1))
    assert any("temperature" in p for p in config_doc_problems(int_for_float, fields))
    missing = good.replace(row + "\n", "")
    assert any("temperature" in p and "no row" in p for p in config_doc_problems(missing, fields))


def test_relative_links_point_to_existing_files():
    files = markdown_files()
    assert len(files) > 1 and all(path.is_file() for path in files)
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_link_check_catches_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-section) [ok](#top) [web](https://example.com)\n"
        "# Top\n`[not a link](missing.md)`\n```\n[not a link](missing.md)\n```\n"
        "[bad](missing.md) [bad anchor](other.md#nowhere)\n[ref]: gone/file.md\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert {p.split(": ", 1)[1].split(" ->")[0] for p in problems} == {"missing.md", "other.md#nowhere", "gone/file.md"}


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_python_code_blocks_parse(path):
    blocks = re.findall(r"^([ \t]*)```python\n(.*?)^\1```", path.read_text(encoding="utf-8"), re.S | re.M)
    for _, block in blocks:
        ast.parse(textwrap.dedent(block))
