"""The documentation is complete and current: every setting, metric and CLI option is in docs/,
the generated tables match the code, and every link in README and docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import click
import typer.main
from prometheus_client import CollectorRegistry

from llmserve.cli.main import app
from llmserve.config import MetricsConfig, iter_settings
from llmserve.config_reference import render_reference, render_restart_settings
from llmserve.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *DOCS]
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _docs_text() -> str:
    return "\n".join(page.read_text() for page in DOCS)


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, "README: what it is, quick start, commands, a config, links"


def test_every_setting_is_in_the_configuration_reference():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name, _ in iter_settings() if f"`{name}`" not in reference]
    assert missing == []
    assert render_reference() in reference, (
        "run: python -m llmserve.config_reference docs/configuration.md"
    )


def test_the_readme_lists_exactly_the_settings_a_reload_refuses():
    readme = (ROOT / "README.md").read_text()
    assert render_restart_settings() in readme, (
        "run: python -m llmserve.config_reference docs/configuration.md README.md"
    )


def test_every_metric_is_documented():
    metrics = Metrics(CollectorRegistry(), MetricsConfig())
    families = {name.removesuffix("_total").removesuffix("_bucket") for name in
                metrics.series_names() if not name.endswith(("_sum", "_count"))}  # fmt: skip
    text = _docs_text()
    assert sorted(name for name in families if name not in text) == []


def _options(command: click.Command, path: str) -> list[tuple[str, str]]:
    found = [(path, opt) for param in command.params for opt in param.opts
             if opt.startswith("--") and opt != "--help"]  # fmt: skip
    for name, sub in getattr(command, "commands", {}).items():  # a group (typer's own class)
        found += _options(sub, f"{path} {name}")
    return found


def test_every_cli_command_and_option_is_documented():
    text = _docs_text() + (ROOT / "README.md").read_text()
    root = typer.main.get_command(app)
    missing = [f"{path}: {opt}" for path, opt in _options(root, "llmserve") if opt not in text]
    assert missing == []
    commands = [name for name in getattr(root, "commands", {}) if f"llmserve {name}" not in text]
    assert commands == []


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in _LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and _anchor(anchor) not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def _anchor(text: str) -> str:
    return text.lower()


def _anchors(file: Path) -> set[str]:
    heads = re.findall(r"(?m)^#+ (.+)$", file.read_text())
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


def test_the_stream_lifecycle_rules_name_tests_that_exist():
    from llmserve.api import stream

    doc = stream.__doc__ or ""
    cited = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", doc)
    assert len(cited) >= 9
    for path, name in cited:
        source = (ROOT / path).read_text()
        assert not name or f"def {name}(" in source, f"{path}::{name}"
