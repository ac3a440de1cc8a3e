"""The repository stands on its own: what a clone needs is in it, declared and pointed to.

These are checks of files, not of behaviour: a clone has no `../shared/`, an installed
wheel has no source tree to fall back on, and a dependency that only arrives through
another package's requirements can vanish with that package's next release.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import app

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_distributions() -> set[str]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return {
        _normalize(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]) for dep in project["dependencies"]
    }


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level modules imported by app/ that are neither stdlib nor app, with the files."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "app").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top in sys.stdlib_module_names or top in {"app", "__future__"}:
                    continue
                found.setdefault(top, []).append(path.name)
    return found


def test_every_imported_package_is_declared() -> None:
    # Regression: app/http.py imported werkzeug, which only came in through quart.
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = {
        module: files
        for module, files in _third_party_imports().items()
        if not {_normalize(d) for d in providers.get(module, [module])} & declared
    }
    assert undeclared == {}


def test_one_version_source() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert "version" not in project, "the version is written in app/__init__.py only"
    assert "version" in project["dynamic"]
    assert importlib.metadata.version("chatwatch") == app.__version__


def test_license_file_matches_the_declared_license() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "the chatwatch authors" in text


def test_nothing_points_outside_the_repository() -> None:
    # A clone has no ../shared/: README, code and docs point into the repository. The one
    # exception is the optional cross-check of the benchmark against the independent harness.
    paths = [ROOT / "README.md", *(ROOT / "app").rglob("*.py"), *(ROOT / "docs").rglob("*.md")]
    mentions = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in paths
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "shared/" in line
    ]
    assert len(mentions) <= 1, mentions
    assert all("cross-check" in m for m in mentions), mentions


def test_docs_the_readme_points_to_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme) + re.findall(r"`(docs/[^`]+)`", readme):
        assert (ROOT / target).is_file(), target
    assert (ROOT / "docs" / "contract.md").is_file()
    assert (ROOT / "docs" / "findings.md").is_file()
