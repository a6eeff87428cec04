"""Prompt templates live in files (``toushi/templates/<lang>/<name>.j2``), never in Python strings.

A recipe may point at its own template file instead; both render with the same variables.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,  # a missing variable is a bug in the caller, not an empty string
    keep_trailing_newline=False,
    autoescape=False,
)


def template_path(name: str, lang: str) -> Path:
    return TEMPLATE_DIR / lang / f"{name}.j2"


def render(name: str, lang: str, /, **variables) -> str:
    """Render the built-in template ``<lang>/<name>.j2`` (positional-only, so a template may use ``name``)."""
    if not template_path(name, lang).exists():
        raise FileNotFoundError(f"no built-in template {lang}/{name}.j2 in {TEMPLATE_DIR}")
    return _env.get_template(f"{lang}/{name}.j2").render(**variables).strip()


def render_file(path: str | Path, **variables) -> str:
    """Render a user-supplied template file (same variables as the built-in one it replaces)."""
    text = Path(path).read_text(encoding="utf-8")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False).from_string(text).render(
        **variables
    ).strip()


def render_any(name: str, lang: str, override: str | Path | None = None, /, **variables) -> str:
    """The recipe's template file when given, else the built-in one."""
    return render_file(override, **variables) if override else render(name, lang, **variables)
