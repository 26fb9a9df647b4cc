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

from llmserve.config import iter_settings

BEGIN = (
    "<!-- config-reference:begin "
    "(generated: python -m llmserve.config_reference docs/configuration.md) -->"
)
END = "<!-- config-reference:end -->"


def render_reference() -> str:
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, field in iter_settings():
        rows.append(f"| `{name}` | {_default(field)} | {field.description} |")
    return "\n".join([BEGIN, *rows, END])


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
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render_reference() + text[end:]
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    update_file(Path(sys.argv[1]))
