"""`llmserve check` refuses engine.options that vLLM does not know (it needs vllm to know)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llmserve.cli.main import app

pytestmark = pytest.mark.engine


def test_check_names_an_unknown_engine_option_and_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {options: {max_num_seq: 4}}\n")
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert "engine.options.max_num_seq: not an option of vLLM's AsyncEngineArgs" in result.stderr
    assert "did you mean 'max_num_seqs'?" in result.stderr


def test_check_accepts_a_real_engine_option(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {options: {enable_prefix_caching: true}}\n")
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.stderr
    assert "enable_prefix_caching: true" in result.stdout
