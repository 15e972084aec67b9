"""Sphinx configuration: ``python -m sphinx -b html docs docs/_build/html``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Document the package of this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import socketio_dbctx

project = "socketio_dbctx"
copyright = "socketio_dbctx contributors"
author = "socketio_dbctx contributors"
release = socketio_dbctx.__version__
version = release

extensions = ["sphinx.ext.autodoc"]

exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"socketio_dbctx {release}"

autodoc_member_order = "bysource"
autodoc_preserve_defaults = True

# socketio_dbctx.prometheus needs the optional prometheus_client; without it the
# API reference is still built.
if importlib.util.find_spec("prometheus_client") is None:
    autodoc_mock_imports = ["prometheus_client"]

# Classes users receive but never construct: their constructor is not API.
_NOT_CONSTRUCTED = {"socketio_dbctx.Event", "socketio_dbctx.PeriodicTask"}


def _hide_constructor(app, what, name, obj, options, signature, return_annotation):
    if what == "class" and name in _NOT_CONSTRUCTED:
        return "", None
    return None


def setup(app):
    app.connect("autodoc-process-signature", _hide_constructor)
