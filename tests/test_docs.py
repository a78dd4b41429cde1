"""The manual cannot drift from the code: README.md and docs/*.md are checked against it.

- docs/configuration.md documents every `section.key` of lib/config.py, no other, each with
  its dataclass default;
- every markdown link resolves: relative links only, to files that exist and to headings that
  exist (GitHub's anchors);
- every file path and `lib.` name the pages mention exists;
- the README stays the front door (at most 300 lines), and no page carries work history.
(The pages' examples and command lines are run by tests/test_readme.py.)
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from lib import config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MENTIONING = [*PAGES, ROOT / "CONTRIBUTING.md"]  # pages whose file and module names are checked


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


# -- configuration ---------------------------------------------------------------------------
def documented_keys() -> dict[str, str]:
    """`section.key` -> the default cell, from docs/configuration.md's table of every key."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text.split("\n## Every key\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+\.\w+)` \| ([^|]+) \|", section, re.M)
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)), f"keys documented twice: {keys}"
    return {key: default.strip() for key, default in rows}


def dataclass_defaults() -> dict[str, object]:
    """`section.key` -> its default, for every field of JobConfig's sections."""
    defaults = {}
    for section in dataclasses.fields(config.JobConfig):
        for item in dataclasses.fields(section.default_factory()):
            default = item.default
            if default is dataclasses.MISSING:  # a list's default_factory
                default = item.default_factory()
            defaults[f"{section.name}.{item.name}"] = default
    return defaults


def test_configuration_documents_every_key_and_no_other():
    assert sorted(documented_keys()) == sorted(dataclass_defaults())


def test_configuration_shows_each_key_with_its_default():
    wrong = {}
    for key, default in dataclass_defaults().items():
        cell = documented_keys()[key]
        if default == config.REQUIRED:
            shown = cell == "required"
        else:
            match = re.fullmatch(r"`([^`]*)`", cell)
            shown = match is not None and yaml.safe_load(match[1]) == default
            shown = shown and type(yaml.safe_load(match[1])) is type(default)
        if not shown:
            wrong[key] = (cell, default)
    assert wrong == {}


# -- links -----------------------------------------------------------------------------------
def links(page: Path) -> list[str]:
    """The targets of a page's markdown links and images, outside code."""
    return re.findall(r"\[[^\]]*\]\(([^)\s]*)\)", prose(page.read_text()))


def test_pages_have_links():
    assert all(links(page) for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            broken.append(f"{target}: not a relative link")
            continue
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == []


def test_anchors_follow_github():
    assert slug("Scores: entropy, documents, calibration") == "scores-entropy-documents-calibration"
    assert slug("One row per example (`output.rows=examples`)") == (
        "one-row-per-example-outputrowsexamples"
    )
    assert slug("Object storage (s3:// and others)") == "object-storage-s3-and-others"


# -- names of files and modules --------------------------------------------------------------
def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def resolves(dotted: str) -> bool:
    """Whether `lib.a.b.name` is a module or package of lib, or a top-level name in one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = (
            base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        )
        if module.exists():
            rest = parts[cut:]
            return not rest or (len(rest) == 1 and rest[0] in _top_level_names(module))
    return False


@pytest.mark.parametrize("page", MENTIONING, ids=name)
def test_every_file_and_module_named_exists(page):
    text = page.read_text()
    missing = []
    for path in re.findall(r"(?<![\w./-])((?:lib|tests|jobs|configs|docs)/[\w./-]*\w/?)", text):
        if not (ROOT / path).exists():
            missing.append(path)
    for dotted in re.findall(r"(?<![\w./-])(lib(?:\.\w+)+)", text):
        if not resolves(dotted):
            missing.append(dotted)
    reading_api = _top_level_names(ROOT / "lib" / "results.py")
    for function in re.findall(r"(?<![\w./-])results\.(\w+)\(", text):
        if function not in reading_api:
            missing.append(f"results.{function}")
    assert missing == []


# -- the front door --------------------------------------------------------------------------
def test_the_readme_is_the_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", MENTIONING, ids=name)
def test_no_work_history(page):
    """What changed since last time belongs in commit messages, not in the manual."""
    history = r"\b(?:issue|session|sprint|ticket) #?\d+|\bthe README before\b|lib[./]pipeline\b"
    assert re.findall(history, page.read_text(), re.I) == []
