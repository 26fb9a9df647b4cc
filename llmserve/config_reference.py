"""docs/configuration.md's reference table, generated from the config tree (one source).

`python -m llmserve.config_reference docs/configuration.md` rewrites the block between the markers;
tests/test_config.py fails when that block is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmserve.config import RELOADABLE, RESTART_ONLY, iter_settings, restart_only

BEGIN = (
    "<!-- config-reference:begin "
    "(generated: python -m llmserve.config_reference docs/configuration.md) -->"
)
END = "<!-- config-reference:end -->"


RESTART_BEGIN = (
    "<!-- restart-settings:begin (generated: python -m llmserve.config_reference "
    "docs/configuration.md README.md) -->"
)
RESTART_END = "<!-- restart-settings:end -->"


def render_reference() -> str:
    rows = ["| setting | default | on reload | meaning |", "|---|---|---|---|"]
    for name, field in iter_settings():
        reload = "restart" if restart_only(name) else "applied"
        rows.append(f"| `{name}` | {_default(field)} | {reload} | {field.description} |")
    return "\n".join([BEGIN, *rows, END])


def render_restart_settings() -> str:
    """The settings a reload refuses, as one line of `names` (a trailing `*` for a group)."""
    names = [f"`{p[:-1]}.*`" if p.endswith(".") else f"`{p}*`" if p.endswith("_") else f"`{p}`"
             for p in RESTART_ONLY]  # fmt: skip
    names = [name + _but_not(p) for name, p in zip(names, RESTART_ONLY, strict=True)]
    return "\n".join([RESTART_BEGIN, ", ".join(names), RESTART_END])


def _but_not(prefix: str) -> str:
    """The settings under a restart-only prefix that a reload applies all the same."""
    applied = [f"`{name}`" for name in RELOADABLE if name.startswith(prefix)]
    return f" (but not {' or '.join(applied)})" if applied else ""


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        if isinstance(value, dict) and value and isinstance(next(iter(value.values())), BaseModel):
            return "`" + ", ".join(value) + "`"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def update_file(path: Path) -> bool:
    """Rewrite the generated blocks the file holds (the reference, the restart list)."""
    text = new = path.read_text()
    for begin, end, render in ((BEGIN, END, render_reference),
                               (RESTART_BEGIN, RESTART_END, render_restart_settings)):  # fmt: skip
        if begin in new:
            start, stop = new.index(begin), new.index(end) + len(end)
            new = new[:start] + render() + new[stop:]
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        update_file(Path(argument))
