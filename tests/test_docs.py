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


def default_table_problems(markdown: str, fields: list[dataclasses.Field]) -> list[str]:
    """
    Rows of any `field | default` table (a row may name several fields, `a`, `b` | 1, 2) whose defaults, one per named
    field and written as Python literals, differ from TMSConfig's. Values that are not literals (`<output_dir>/...`)
    are not checked.
    """
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    problems = []
    for row in table_rows(markdown):
        names = re.findall(r"`([^`]+)`", row.get("field", ""))
        if "default" not in row or not names or not all(name in defaults for name in names):
            continue
        values = [value.strip() for value in row["default"].split(",")]
        if len(values) != len(names):
            problems.append(f"{', '.join(names)}: {len(names)} fields but {len(values)} defaults ({row['default']!r})")
            continue
        for name, value in zip(names, values):
            try:
                written = ast.literal_eval(value.split(" (")[0].strip("`"))
            except (ValueError, SyntaxError):
                continue
            if type(written) is not type(defaults[name]) or written != defaults[name]:
                problems.append(f"`{name}`: default written as {value!r}, real default {defaults[name]!r}")
    return problems


def signature_problems(markdown: str) -> list[str]:
    """
    Code spans that write out a public callable's whole parameter list, `Name(arg, key=value, ...)`, with a default
    other than the real one. A call that names only some parameters is an example, not a signature, and is skipped.
    """
    import inspect

    import trl_tms

    problems = []
    for match in _CODE_SPAN.finditer(_FENCE.sub("", markdown)):
        try:
            call = ast.parse(" ".join(match.group(2).split()), mode="eval").body
        except SyntaxError:
            continue
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            continue
        target = getattr(trl_tms, call.func.id, None)
        if not callable(target):
            continue
        parameters = inspect.signature(target).parameters
        written = [arg.id for arg in call.args if isinstance(arg, ast.Name)] + [k.arg for k in call.keywords]
        if written != list(parameters):
            continue
        for keyword in call.keywords:
            try:
                value = ast.literal_eval(keyword.value)
            except ValueError:
                continue
            default = parameters[keyword.arg].default
            if type(value) is not type(default) or value != default:
                problems.append(f"{call.func.id}({keyword.arg}={value!r}): the real default is {default!r}")
    return problems


# "<n> of the <N> built in by default": only the forgetting meter uses a default share of its built-in prompts.
_METER_SHARE = re.compile(r"(\d+) of the (\d+) built in by default")


def meter_share_problems(markdown: str) -> list[str]:
    from trl_tms import METER_PROMPTS

    default = TMSConfig.__dataclass_fields__["retention_num_prompts"].default
    return [
        f"{match.group(0)!r}: the meter uses {default} of the {len(METER_PROMPTS)} built-in prompts by default"
        for match in _METER_SHARE.finditer(" ".join(markdown.split()))
        if (int(match.group(1)), int(match.group(2))) != (default, len(METER_PROMPTS))
    ]


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


def module_map_problems(markdown: str, package: Path) -> list[str]:
    """
    Where concepts.md's module map ("Where each stage lives": its `module` columns name `name.py`, and `sub/name.py` for
    the modules of a subpackage) and the package's modules disagree: a newcomer finds each stage by its file name only
    if the map names them all.
    """
    section = markdown.split("## Where each stage lives", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in table_rows(section):
        named |= set(re.findall(r"`((?:\w+/)?\w+\.py)`", row.get("module", "")))
    real = {path.name for path in package.glob("*.py") if path.name != "__init__.py"}
    real |= {f"{path.parent.name}/{path.name}" for path in package.glob("*/*.py") if path.name != "__init__.py"}
    return [f"{name}: not in the module map" for name in sorted(real - named)] + [
        f"{name}: in the module map, not in the package" for name in sorted(named - real)
    ]


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


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_python_code_blocks_parse(path):
    blocks = re.findall(r"^([ \t]*)```python\n(.*?)^\1```", path.read_text(encoding="utf-8"), re.S | re.M)
    for _, block in blocks:
        ast.parse(textwrap.dedent(block))


def test_defaults_written_elsewhere_in_the_docs_are_the_real_ones():
    problems = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        checks = default_table_problems(text, tms_fields()) + signature_problems(text) + meter_share_problems(text)
        problems += [f"{path.name}: {p}" for p in checks]
    assert not problems, "defaults out of date:\n" + "\n".join(problems)


def test_default_checks_catch_a_wrong_meter_default():
    config = CONFIG_PAGE.read_text(encoding="utf-8")
    how_to = (DOCS / "how-to.md").read_text(encoding="utf-8")
    row = next(line for line in config.splitlines() if line.startswith("| `retention_num_prompts` |"))
    assert "| `6` |" in row and "max_new_tokens=16, top_k" in how_to
    assert default_table_problems(config, tms_fields()) == []
    wrong_row = default_table_problems(config.replace(row, row.replace("| `6` |", "| `8` |")), tms_fields())
    assert wrong_row == ["`retention_num_prompts`: default written as '`8`', real default 6"]
    # A row naming several fields, one default each, in order.
    combined = "| field | default |\n|---|---|\n| `log_retention`, `retention_num_prompts`, `retention_max_new_tokens` | {} |\n"
    assert default_table_problems(combined.format("True, 6, 16"), tms_fields()) == []
    assert default_table_problems(combined.format("True, 16, 6"), tms_fields()) == [
        "`retention_num_prompts`: default written as '16', real default 6",
        "`retention_max_new_tokens`: default written as '6', real default 16"]
    assert default_table_problems(combined.format("True, 6"), tms_fields()) == [
        "log_retention, retention_num_prompts, retention_max_new_tokens: 3 fields but 2 defaults ('True, 6')"]
    wrong_signature = signature_problems(how_to.replace("max_new_tokens=16, top_k", "max_new_tokens=24, top_k"))
    assert wrong_signature == ["RetentionCallback(max_new_tokens=24): the real default is 16"]
    assert meter_share_problems("the meter answers 6 of the 64 built in by default") == []
    assert len(meter_share_problems("the meter answers 8 of the 64\nbuilt in by default")) == 1


def test_the_module_map_names_every_module():
    assert module_map_problems((DOCS / "concepts.md").read_text(encoding="utf-8"), ROOT / "trl_tms") == []


def test_module_map_check_catches_a_missing_and_a_stale_module(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py", "sub/d.py"):
        (package / name).write_text("")
    page = ("## Where each stage lives\n\n| module | owns |\n|---|---|\n| `a.py`, `gone.py` | x |\n\nSubpackage:\n\n"
            "| module | owns |\n|---|---|\n| `sub/c.py` | y |\n\n## Next\n| `b.py` | z |\n")
    assert module_map_problems(page, package) == ["b.py: not in the module map", "sub/d.py: not in the module map",
                                                  "gone.py: in the module map, not in the package"]
