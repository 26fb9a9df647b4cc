"""`llmserve worker`: vLLM's headless engine processes on a node other than the head.

An engine spread over several nodes with vLLM's multiprocess backend (docs/scaling.md) has one
head, `llmserve up` (the API, data-parallel rank 0), and on every other node vLLM's headless
mode, what `vllm serve --headless` runs. This module starts exactly that code path
(`vllm.entrypoints.cli.serve`, `ServeSubcommand.cmd`), with AsyncEngineArgs made from the
same `engine:` section as the head's (`vllm_args.build_worker_launch`), so head and workers
never disagree on a setting. Nothing here is rewritten from vLLM: it only builds the
arguments `vllm serve` would have parsed.

vLLM's headless mode catches SIGTERM and SIGINT and shuts its engine processes down; a reaper
(`reaper.py`) kills them if this process is SIGKILLed. Exit codes: 0 after SIGTERM/SIGINT,
1 when vLLM's processes ended by themselves (an engine died, or could not start) or the head
went away.

Measured here (docs/scaling.md): vLLM's headless engines never notice that the head is gone,
and a restarted head waits for them in vain (they made their handshake with the old one). So
the worker watches the head's API port (a TCP connect, no request: nothing in the head's
access log): once it has accepted, a head that stops accepting makes the worker shut its
engines down and exit 1, for its supervisor to start it again, and it then joins the new
head.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine.node_heartbeat import HeartbeatSender
from llmserve.engine.reaper import Reaper
from llmserve.engine.vllm_args import (
    BASE_ENV,
    EngineLaunch,
    WorkerPlan,
    build_worker_launch,
    cpu_dtype,
    read_cpu_flags,
    read_mem_available,
    resolve_device,
    vllm_serve_command,
    worker_plan,
)

log = logging.getLogger(__name__)


def prepare_worker(config: EngineConfig) -> EngineLaunch:
    """Check the model and the node settings; the launch vLLM's headless mode will get (imports
    torch to see the device, and vllm for the names of its engine arguments)."""
    from llmserve.engine.vllm import _check_model_exists, _cuda_available, _engine_arg_names

    _check_model_exists(config.model)
    device = resolve_device(config, _cuda_available())
    flags, memory = read_cpu_flags(), read_mem_available()
    launch = build_worker_launch(config, device, _engine_arg_names(), flags, memory)
    if device == "cpu":
        choice = cpu_dtype(config, flags, memory)
        log.log(logging.WARNING if choice.slow else logging.INFO,
                "engine dtype on CPU: %s", choice.reason)  # fmt: skip
    return launch


def run_worker(config: EngineConfig, head: tuple[str, int] | None = None) -> int:
    """Run this node's share of the engine until SIGTERM/SIGINT (0), or until vLLM's processes
    end by themselves or the head's API port (`head`: host, port) stops accepting (1). Raise
    EngineStartError for settings this node cannot run."""
    plan = worker_plan(config)
    for name, value in BASE_ENV.items():
        os.environ.setdefault(name, value)
    launch = prepare_worker(config)
    os.environ.update(launch.env)
    log.info("llmserve worker: %s", plan.describe(config))
    env = [f"{name}={value}" for name, value in launch.env.items()]
    command = shlex.join([*env, *vllm_serve_command(launch.engine_args)])
    log.info("llmserve worker runs: %s", command)
    args = _serve_namespace(launch.engine_args)
    watch = HeadWatch(head, on_lost=_stop_self) if head else None
    heartbeat = HeartbeatSender(heartbeat_address(config), node_label(plan))
    reaper = Reaper.start()  # before vLLM's processes exist
    try:
        if watch is not None:
            watch.start()
        heartbeat.start()
        code = _run_headless(args)
        return 1 if watch is not None and watch.lost else code
    finally:
        heartbeat.stop()
        if watch is not None:
            watch.stop()
        if reaper is not None:
            reaper.stop()


def heartbeat_address(config: EngineConfig) -> tuple[str, int]:
    """Where the head listens for this node's heartbeats (node_heartbeat.py)."""
    nodes = config.nodes
    host = nodes.data_parallel_address or nodes.master_addr or "127.0.0.1"
    return host, nodes.heartbeat_port


def node_label(plan: WorkerPlan) -> str:
    """How the head's log names this node."""
    ranks = plan.ranks
    shown = str(ranks.start) if len(ranks) == 1 else f"{ranks.start}-{ranks.stop - 1}"
    if plan.nnodes > 1:
        return f"node {plan.node_rank} (data-parallel rank {shown})"
    return f"node of data-parallel rank {shown}"


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # vLLM's own handler: a graceful shutdown


class HeadWatch:
    """Connects to the head's API port every `interval` seconds (and closes at once). Once a
    connection has been accepted, the head counts as gone after `refused_limit` refused
    connections in a row (nothing listens: the process ended) or `silent_seconds` without an
    accepted one (host down, network cut); then `on_lost` runs, once. A head never reached is
    never declared gone (its port may not be reachable from this node)."""

    def __init__(
        self,
        address: tuple[str, int],
        on_lost: Callable[[], None],
        *,
        interval: float = 0.5,
        refused_limit: int = 2,
        silent_seconds: float = 30.0,
        unseen_warning_seconds: float = 120.0,
        connect_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self._on_lost = on_lost
        self._interval = interval
        self._refused_limit = refused_limit
        self._silent = silent_seconds
        self._unseen_warning = unseen_warning_seconds
        self._timeout = connect_timeout
        self._clock = clock
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.seen = False
        self.lost = False
        self._refused = 0
        self._last_accepted = 0.0
        self._started = clock()
        self._warned = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmserve-head-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(self._timeout + 1)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            if self.observe(self.probe()):
                host, port = self.address
                log.error(
                    "the head (%s:%s) is gone: stopping this worker (exit 1) so that, started "
                    "again, it joins the next head",
                    host,
                    port,
                )
                self._on_lost()
                return

    def observe(self, outcome: str) -> bool:
        """Take one probe's outcome (`ok`, `refused` or `failed`); True once the head is gone."""
        if self.lost:
            return False
        now = self._clock()
        if outcome == "ok":
            if not self.seen:
                log.info("llmserve worker: the head accepts at %s:%s", *self.address)
            self.seen, self._refused, self._last_accepted = True, 0, now
            return False
        if not self.seen:
            if not self._warned and now - self._started >= self._unseen_warning:
                self._warned = True
                log.warning(
                    "the head's API at %s:%s has not accepted a connection in %.0f s: this "
                    "worker will not notice if the head goes away (see `llmserve worker --head`)",
                    *self.address,
                    now - self._started,
                )
            return False
        self._refused = self._refused + 1 if outcome == "refused" else 0
        if self._refused >= self._refused_limit or now - self._last_accepted >= self._silent:
            self.lost = True
        return self.lost

    def probe(self) -> str:
        try:
            with socket.create_connection(self.address, timeout=self._timeout):
                return "ok"
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "failed"


def head_address(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets: [::1]:8000) as (host, port); ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _serve_namespace(engine_args: dict[str, Any]) -> Any:
    """The argparse namespace `vllm serve MODEL --headless` makes with these engine arguments
    given as flags (vLLM's namespace names are the AsyncEngineArgs field names, which
    AsyncEngineArgs.from_cli_args reads back). The others keep `vllm serve`'s defaults: the
    few that differ from AsyncEngineArgs' own (the head's) are pinned by
    tests/engine/test_engine_worker_node.py."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from llmserve.engine.vllm import _engine_arg_objects

    cli_env_setup()  # what `vllm` does first: the spawn start method for its processes
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    args = parser.parse_args(["serve", str(engine_args["model"]), "--headless"])
    for name, value in _engine_arg_objects(engine_args).items():
        setattr(args, name, value)
    return args


def _run_headless(args: Any) -> int:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.logger import configure_logging_from_args

    command = ServeSubcommand()
    configure_logging_from_args(args)
    command.validate(args)
    try:
        command.cmd(args)  # blocks; vLLM turns SIGTERM/SIGINT into SystemExit and shuts down
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
        log.info("llmserve worker: stopped")
        return 0
    log.error("llmserve worker: vLLM's engine processes ended; exiting 1")
    return 1
