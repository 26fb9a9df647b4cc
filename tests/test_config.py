"""Loading llmserve.yaml: defaults, environment, and precise errors for broken files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.config import Config, iter_settings, load_config, parse_config
from llmserve.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server:\n  prot: 8000\n",
         "x.yaml: server: unknown setting 'prot' (did you mean 'port'?)"),
        ("limits:\n  tiers:\n    free: {tokens_per_minute: lots}\n",
         "x.yaml: limits.tiers.free.tokens_per_minute: expected a valid integer, unable to parse "
         "string as an integer (got 'lots')"),
        ("limits:\n  tiers:\n    free: {tokens_per_minit: 5}\n",
         "x.yaml: limits.tiers.free: unknown setting 'tokens_per_minit' (did you mean "
         "'tokens_per_minute'?)"),
        ("server:\n  port: 70000\n",
         "x.yaml: server.port: expected less than or equal to 65535 (got 70000)"),
        ("engine:\n  kind: tgi\n", "x.yaml: engine.kind: expected 'vllm' or 'fake' (got 'tgi')"),
        ("server:\n  max_body_bytes: huge\n", "x.yaml: server.max_body_bytes: could not parse"),
        ("engine: {cpu_kv_cache_bytes: lots}\n",
         "x.yaml: engine.cpu_kv_cache_bytes: expected auto or a size such as 1GiB (got 'lots')"),
        ("engine: {cpu_kv_cache_bytes: 0}\n",
         "x.yaml: engine.cpu_kv_cache_bytes: expected auto or a size above 0 (got 0)"),
        ("logging: {format: xml}\n", "x.yaml: logging.format: expected 'text' or 'json'"),
        ("limits: {default_tier: gold}\n",
         "x.yaml: limits: default_tier 'gold' is not one of the tiers (default)"),
        ("sevrer: {}\n", "x.yaml: unknown setting 'sevrer' (did you mean 'server'?)"),
        ("server: [1, 2]\n", "x.yaml: server: expected a valid dictionary"),
        ("- just\n- a list\n", "x.yaml: expected a mapping of sections at the top level"),
        ("server:\n  port: 1\n   host: x\n", "x.yaml:3:8: invalid YAML"),
        ("auth:\n  jwt: {secret: '${LLMSERVE_TEST_UNSET_VAR}'}\n",
         "x.yaml: auth.jwt.secret: environment variable LLMSERVE_TEST_UNSET_VAR is not set"),
    ],
)  # fmt: skip
def test_broken_config_gives_a_precise_message(text, message, monkeypatch):
    monkeypatch.delenv("LLMSERVE_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="x.yaml")
    assert message in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_environment_interpolation_with_defaults(monkeypatch):
    monkeypatch.setenv("LLMSERVE_TEST_PORT", "9001")
    monkeypatch.delenv("LLMSERVE_TEST_HOST", raising=False)
    config = parse_config(
        "server: {port: '${LLMSERVE_TEST_PORT}', host: '${LLMSERVE_TEST_HOST:-0.0.0.0}'}"
    )
    assert config.server.port == 9001
    assert config.server.host == "0.0.0.0"


def test_secrets_are_masked_in_the_effective_config(monkeypatch):
    from llmserve.config import effective_config

    monkeypatch.setenv("LLMSERVE_TEST_SECRET", "hunter2-very-secret-of-at-least-32-bytes")
    config = parse_config("auth: {jwt: {secret: '${LLMSERVE_TEST_SECRET}'}}")
    assert config.auth.jwt.secret.get_secret_value().startswith("hunter2-very-secret")
    assert "hunter2" not in str(effective_config(config))


def test_config_path_resolution(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("server: {port: 1111}\n")
    monkeypatch.setenv("LLMSERVE_CONFIG", str(tmp_path / "a.yaml"))
    assert load_config().server.port == 1111
    (tmp_path / "b.yaml").write_text("server: {port: 2222}\n")
    assert load_config(tmp_path / "b.yaml").server.port == 2222


def test_empty_file_gives_all_defaults():
    config = parse_config("")
    assert config == Config()
    assert config.server.max_body_bytes == 4 * 1024 * 1024
    assert config.max_concurrency == config.engine.max_num_seqs


def test_default_config_and_every_example_load():
    files = [ROOT / "llmserve.yaml", *sorted((ROOT / "examples").glob("*.yaml"))]
    loadable = [f for f in files if f.name not in {"prometheus.yml", "alerts.yml"}]
    assert len(loadable) >= 2
    for file in loadable:
        if "prometheus" in file.name or "alert" in file.name:
            continue
        load_config(file)


def test_every_setting_has_a_description():
    assert [name for name, field in iter_settings() if not field.description] == []
