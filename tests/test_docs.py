"""The Sphinx documentation builds with warnings as errors, documents every public name,
and lists every setting with its default. Deselect with ``-m "not docs"``."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import socketio_dbctx

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def settings_defaults() -> dict[str, Any]:
    """``{"DBCTX_<NAME>": default}`` for every setting of the package.

    The one place here that knows where the settings are defined: if they move, change
    this import.
    """
    from socketio_dbctx.config import PREFIX, Settings

    return {PREFIX + field.name.upper(): field.default for field in dataclasses.fields(Settings)}


def documented_settings() -> dict[str, str]:
    """``{key: default as written}`` from the table of ``docs/configuration.rst``."""
    text = (DOCS / "configuration.rst").read_text(encoding="utf-8")
    rows = re.findall(r"^\s*\* - ``(DBCTX_\w+)``\n\s+- ``([^`]*)``", text, re.MULTILINE)
    return dict(rows)


def readme_settings() -> set[str]:
    """The keys in the README's Configuration section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(DBCTX_\w+)`", section))


@pytest.fixture(scope="module")
def build(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("docs-html")
    command = [sys.executable, "-m", "sphinx", "-W", "-b", "html", "-q", str(DOCS), str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result, out


def test_docs_build_with_warnings_as_errors(
    build: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = build
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "index.html").is_file()


def test_api_reference_documents_every_public_name(
    build: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = build
    if result.returncode != 0:
        pytest.fail("the docs did not build; see test_docs_build_with_warnings_as_errors")
    api = (out / "api.html").read_text(encoding="utf-8")
    missing = [name for name in socketio_dbctx.__all__ if f'id="socketio_dbctx.{name}"' not in api]
    assert not missing, f"add these public names to docs/api.rst: {missing}"


def test_configuration_page_lists_every_setting_with_its_default() -> None:
    expected = {key: repr(value).replace("'", '"') for key, value in settings_defaults().items()}
    documented = documented_settings()
    assert documented == expected, "docs/configuration.rst's table is out of date"
    readme = readme_settings()
    assert readme, "no DBCTX_ keys found in the README's Configuration section"
    assert readme <= set(documented), (
        f"README names keys the page lacks: {readme - set(documented)}"
    )


def test_no_docstring_points_at_a_document_users_do_not_have() -> None:
    cited = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "socketio_dbctx").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bDESIGN\b|\bseed/", line)
    ]
    assert not cited, f"these cite documents that are not shipped to users: {cited}"
