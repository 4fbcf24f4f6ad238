#!/usr/bin/env python
"""Write docs/configuration_reference.md from conf/base/parameters*.yml and the comments in them.

    .venv/bin/python docs/gen_config_reference.py          # rewrite the page
    .venv/bin/python docs/gen_config_reference.py --check  # exit 1 if the page is out of date

The YAML comments are the one place a setting is explained; this script only lays them out.
For every key (top level, second level and deeper) it takes the comment lines directly above it
and the comment beside it, with the comment lines under that one that are indented past the key
(a comment continued on the next lines). PyYAML reads the same files and must find exactly the
keys the line scan found, so a layout the scan does not understand fails loudly instead of
producing a wrong page. Values that an environment (``conf/<env>/parameters*.yml``) sets
differently are listed next to the default; ``conf/local`` is never read (it is git-ignored and
machine-specific).

Standard library and PyYAML only: no Kedro, so ``tests/test_config_reference.py`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path("docs/configuration_reference.md")
REGENERATE = ".venv/bin/python docs/gen_config_reference.py"

#: Files in the order a run uses them; any other parameters*.yml follows, sorted.
FILE_ORDER = ("ingestion", "preprocessing", "training", "cascade", "evaluation", "inference",
              "cv", "tuning")
#: Environments never read: the base itself and the developer's own, git-ignored one.
SKIPPED_ENVS = {"base", "local"}

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)\s*:(?=\s|$)(?P<rest>.*)$")
_COMMENT = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")
_LIST_ITEM = re.compile(r"^(?P<indent> *)- ")

#: Per environment: its parameters as loaded, and each key's value as written (for the page).
Environments = dict[str, tuple[dict[str, Any], dict[tuple[str, ...], str]]]


@dataclass
class Entry:
    """One key of a YAML file, with its value as written and the comments that explain it."""

    path: tuple[str, ...]
    indent: int
    raw: str                                          # the value as written; "" for a block
    above: list[str] = field(default_factory=list)    # comment lines directly above the key
    beside: list[str] = field(default_factory=list)   # the comment beside it and its continuation


@dataclass
class ParsedFile:
    """A parameters file: its keys in file order, and comments that belong to no key."""

    name: str
    entries: list[Entry]
    notes: list[list[str]]
    data: dict[str, Any]


def _split_comment(rest: str) -> tuple[str, str | None]:
    """``value  # comment`` -> (value, comment); ``#`` inside quotes or a word is no comment."""
    quote = None
    for i, char in enumerate(rest):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), None


def parse_yaml_with_comments(text: str, name: str) -> ParsedFile:
    """Scan a parameters file line by line: keys, their values as written, and their comments."""
    entries: list[Entry] = []
    notes: list[list[str]] = []
    stack: list[Entry] = []          # the open keys, outermost first
    pending: list[str] = []          # comment lines waiting for the key below them
    continuing: Entry | None = None  # the key whose beside-comment the next comment may continue

    def orphan_pending() -> None:
        if pending:
            notes.append(pending.copy())
            pending.clear()

    for line in text.splitlines():
        if not line.strip():
            orphan_pending()
            continuing = None
            continue
        comment = _COMMENT.match(line)
        if comment:
            text_ = comment["text"].strip()
            if continuing is not None and len(comment["indent"]) > continuing.indent:
                continuing.beside.append(text_)
            else:
                continuing = None
                pending.append(text_)
            continue
        item = _LIST_ITEM.match(line)
        if item:  # an element of the current key's block list: its comment goes to that key
            value, note = _split_comment(line[len(item[0]):])
            if note and stack:
                stack[-1].beside.append(f"`{value}`: {note}")
            orphan_pending()
            continuing = None
            continue
        key = _KEY.match(line)
        if not key:
            raise ValueError(f"{name}: cannot read this line: {line!r}")
        indent = len(key["indent"])
        while stack and stack[-1].indent >= indent:
            stack.pop()
        value, note = _split_comment(key["rest"])
        entry = Entry(path=(*(e.path[-1] for e in stack), key["key"]), indent=indent, raw=value,
                      above=pending.copy(), beside=[note] if note else [])
        pending.clear()
        entries.append(entry)
        stack.append(entry)
        continuing = entry if note else None
    orphan_pending()
    return ParsedFile(name=name, entries=entries, notes=notes, data=yaml.safe_load(text) or {})


def _lookup(data: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False, None
        data = data[key]
    return True, data


def _check_against_yaml(parsed: ParsedFile) -> None:
    """The line scan must find exactly the keys PyYAML finds (below every block mapping)."""
    problems = []
    found = {e.path for e in parsed.entries}
    blocks = [((), parsed.data)] + [
        (e.path, value) for e in parsed.entries if not e.raw
        for ok, value in [_lookup(parsed.data, e.path)] if ok and isinstance(value, dict)]
    for path, value in blocks:
        for key in value:
            if (*path, str(key)) not in found:
                problems.append(".".join((*path, str(key))))
    for entry in parsed.entries:
        if not _lookup(parsed.data, entry.path)[0]:
            problems.append(".".join(entry.path))
    if problems:
        raise ValueError(f"{parsed.name}: the comment scan and PyYAML disagree on these keys: "
                         f"{', '.join(sorted(problems))}; simplify the YAML layout or extend "
                         f"docs/gen_config_reference.py")


def _flow(value: Any) -> str:
    """A value in YAML flow style on one line (for lists written as blocks, and env overrides)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return text.removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """A comment as Markdown text: ``<placeholder>`` outside code spans must not read as HTML."""
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _paragraph(lines: list[str]) -> str:
    """Comment lines above a key, as prose: an empty ``#`` line starts a new paragraph."""
    paragraphs, current = [], []
    for line in map(_prose, lines):
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _parameter_files(conf: Path) -> list[Path]:
    files = sorted(conf.glob("parameters*.yml"))

    def rank(path: Path) -> tuple[int, str]:
        stem = path.stem.removeprefix("parameters").lstrip("_")
        return (FILE_ORDER.index(stem) if stem in FILE_ORDER else len(FILE_ORDER), path.name)

    return sorted(files, key=rank)


def _environments(root: Path) -> Environments:
    """Each tracked environment's parameters: the loaded values and the values as written."""
    envs = {}
    for folder in sorted(p for p in (root / "conf").iterdir() if p.is_dir()):
        files = sorted(folder.glob("parameters*.yml"))
        if folder.name in SKIPPED_ENVS or not files:
            continue
        data: dict[str, Any] = {}
        raw: dict[tuple[str, ...], str] = {}
        for path in files:
            parsed = parse_yaml_with_comments(path.read_text(encoding="utf-8"),
                                              path.relative_to(root).as_posix())
            data.update(parsed.data)
            raw.update({e.path: e.raw for e in parsed.entries if e.raw})
        envs[folder.name] = (data, raw)
    return envs


TABLE_HEAD = ("| key | default | elsewhere | meaning |", "|---|---|---|---|")


def _row(entry: Entry, data: dict[str, Any], envs: Environments) -> str | None:
    """A table row: dotted key, default as written, other environments' values, comments."""
    _, value = _lookup(data, entry.path)
    is_block = not entry.raw and isinstance(value, dict)
    parts = (_paragraph(entry.above), *map(_prose, entry.beside))
    meaning = "<br>".join(part for part in parts if part)
    if is_block and not meaning:
        return None  # a plain grouping key: its children have the rows
    default = "" if is_block else entry.raw or _flow(value)
    elsewhere = []
    for env, (env_data, env_raw) in envs.items():
        found, env_value = _lookup(env_data, entry.path)
        if not is_block and found and env_value != value:
            elsewhere.append(f"{env}: {_code(env_raw.get(entry.path) or _flow(env_value))}")
    cells = (_code(".".join(entry.path)), _code(default), "<br>".join(elsewhere), meaning)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _file_section(parsed: ParsedFile, envs: Environments) -> list[str]:
    """A file's heading, then per top-level key its comments and a table of the keys below it."""
    out = ["", f"## `{parsed.name}`"]
    for note in parsed.notes:
        out += ["", _paragraph(note)]
    rows: list[str] = []

    def flush() -> None:
        if rows:
            out.extend(["", *TABLE_HEAD, *rows])
            rows.clear()

    for entry in parsed.entries:
        if len(entry.path) == 1:
            flush()
            out += ["", f"### `{entry.path[0]}`"]
            if not entry.raw:  # a section: its comments as prose; a scalar gets a row below
                out += ["", _paragraph(entry.above)] if entry.above else []
                out += ["", _prose(" ".join(entry.beside))] if entry.beside else []
                continue
        row = _row(entry, parsed.data, envs)
        if row:
            rows.append(row)
    flush()
    return out


def render(root: Path = REPO_ROOT) -> str:
    """The whole Markdown page, as ``docs/configuration_reference.md`` must hold it."""
    envs = _environments(root)
    out = [
        "# Configuration reference",
        "",
        "<!-- GENERATED by docs/gen_config_reference.py from conf/base/parameters*.yml:",
        "     do not edit.",
        f"     Change the YAML comments instead, then run: {REGENERATE} -->",
        "",
        "Every parameter in `conf/base/parameters*.yml`, with the comments written next to it",
        "in the YAML (the one place a setting is explained). *Default* is the value in",
        "`conf/base`, as written; *elsewhere* lists the environments whose",
        "`conf/<env>/parameters.yml` sets another value. Set any of them for one run with",
        "`--params \"key=value\"`. Environments, how they merge, and when `conf/local` is read:",
        "[configuration.md](configuration.md).",
        "",
        f"This page is generated by `{REGENERATE}`; `tests/test_config_reference.py`",
        "fails when it no longer matches the YAML.",
    ]
    for path in _parameter_files(root / "conf" / "base"):
        parsed = parse_yaml_with_comments(path.read_text(encoding="utf-8"),
                                          path.relative_to(root).as_posix())
        _check_against_yaml(parsed)
        out += _file_section(parsed, envs)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare with the committed file; exit 1 if it differs")
    args = parser.parse_args(argv)
    text = render(REPO_ROOT)
    target = REPO_ROOT / OUTPUT
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date; run: {REGENERATE}", file=sys.stderr)  # noqa: T201
            return 1
        return 0
    target.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
