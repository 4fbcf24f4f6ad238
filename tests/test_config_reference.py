"""The documentation cannot drift: the generated configuration reference matches the YAML, and
every relative link in README.md and docs/*.md points at a file that exists.

Fast (no Kedro session, no subprocess): it reads text files only.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATOR = REPO_ROOT / "docs" / "gen_config_reference.py"
REFERENCE = REPO_ROOT / "docs" / "configuration_reference.md"

#: ``[text](target)`` and ``![alt](target)``; the target ends at whitespace or ``)``.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: A path under docs/ or benchmarks/results/ named in README.md's text (links or not).
README_PATH_MENTION = re.compile(r"(?<![\w/.])((?:docs|benchmarks/results)/[\w./-]*\w)")


def _load_generator():
    """docs/gen_config_reference.py as a module (docs/ is no package)."""
    name = "_docs_gen_config_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GENERATOR)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module   # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_configuration_reference_is_up_to_date() -> None:
    generator = _load_generator()
    expected = generator.render(REPO_ROOT)
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    assert committed == expected, (
        "docs/configuration_reference.md does not match conf/base/parameters*.yml (or an "
        "environment's overrides). Regenerate it from the repository root with:\n"
        f"    {generator.REGENERATE}\n"
        "and commit the result. Explain settings in the YAML comments, not in the generated page.")


def test_generator_reads_comments_above_beside_and_continued() -> None:
    generator = _load_generator()
    text = (
        "# Section: what it is.\n"
        "section:\n"
        "  size_px: 96      # model input, px\n"
        "                   # continued here\n"
        "  # the next key's own comment\n"
        "  name: 'a # not a comment'\n"
        "  items:\n"
        "    - {a: 1}       # first item\n"
    )
    parsed = generator.parse_yaml_with_comments(text, "example.yml")
    entries = {".".join(e.path): e for e in parsed.entries}
    assert entries["section"].above == ["Section: what it is."]
    assert entries["section.size_px"].raw == "96"
    assert entries["section.size_px"].beside == ["model input, px", "continued here"]
    assert entries["section.name"].above == ["the next key's own comment"]
    assert entries["section.name"].raw == "'a # not a comment'"
    assert entries["section.items"].beside == ["`{a: 1}`: first item"]


def _markdown_files() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _relative_targets(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)   # code blocks hold no links
    targets = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue   # https:, mailto:, ... and anchors within the page
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("page", _markdown_files(),
                         ids=lambda page: page.relative_to(REPO_ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in _relative_targets(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO_ROOT)} links to files that do not exist: {missing}"


def test_paths_named_in_readme_exist() -> None:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = sorted({m for m in README_PATH_MENTION.findall(text) if not (REPO_ROOT / m).exists()})
    assert not missing, f"README.md names docs/ paths that do not exist: {missing}"
