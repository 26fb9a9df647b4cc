"""RespClient: the parser and URL rules alone, then against a real Redis server (pipelining,
AUTH, SELECT, unix socket, TLS, timeouts, lost connections, cancelled callers)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmserve.errors import ConfigError
from llmserve.limits.stores import store_from_url
from llmserve.limits.stores.resp import (
    INCOMPLETE,
    RespClient,
    RespConnectionError,
    RespError,
    RespOptions,
    RespParser,
    Script,
    encode_command,
    handshake_commands,
    parse_url,
)
from tests.support.redis_server import RedisServer, free_port, start_or_skip

REPLIES: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", "OK"),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    (b"$-1\r\n", None),
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"*3\r\n$-1\r\n:1\r\n+x\r\n", [None, 1, "x"]),
    (b"*2\r\n*2\r\n:1\r\n$1\r\na\r\n*1\r\n*0\r\n", [[1, b"a"], [[]]]),
]


def parse_all(chunks: list[bytes]) -> list[Any]:
    parser = RespParser()
    replies = []
    for chunk in chunks:
        parser.feed(chunk)
        while (reply := parser.pop()) is not INCOMPLETE:
            replies.append(reply)
    assert parser.buffered == 0
    return replies


# --- pure: parser, encoder, URL ---------------------------------------------------------


@pytest.mark.parametrize(("wire", "expected"), REPLIES)
def test_each_reply_type_parses(wire: bytes, expected: Any) -> None:
    assert parse_all([wire]) == [expected]


def test_replies_split_byte_by_byte_parse_the_same() -> None:
    wire = b"".join(w for w, _ in REPLIES)
    assert parse_all([wire[i : i + 1] for i in range(len(wire))]) == [e for _, e in REPLIES]


def test_a_reply_is_incomplete_until_its_last_byte() -> None:
    wire = b"*2\r\n$3\r\nabc\r\n:5\r\n"
    parser = RespParser()
    for byte in wire[:-1]:
        parser.feed(bytes([byte]))
        assert parser.pop() is INCOMPLETE
    parser.feed(wire[-1:])
    assert parser.pop() == [b"abc", 5]


def test_several_replies_in_one_chunk_come_out_in_order() -> None:
    wire = b"".join(w for w, _ in REPLIES) * 3
    assert parse_all([wire]) == [e for _, e in REPLIES] * 3


def test_error_replies_become_resp_errors() -> None:
    top, nested = parse_all([b"-NOSCRIPT No matching script\r\n*2\r\n-ERR bad\r\n:1\r\n"])
    assert isinstance(top, RespError) and str(top) == "NOSCRIPT No matching script"
    assert isinstance(nested[0], RespError) and str(nested[0]) == "ERR bad"
    assert nested[1] == 1


@pytest.mark.parametrize("wire", [b"?what\r\n", b"$2\r\nabc\r\n", b":notanumber\r\n"])
def test_malformed_replies_are_value_errors(wire: bytes) -> None:
    parser = RespParser()
    parser.feed(wire)
    with pytest.raises(ValueError):
        parser.pop()


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command(("SET", "k", 1.5, -3)) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n1.5\r\n$2\r\n-3\r\n"
    )
    # Lengths count bytes, not characters.
    assert encode_command(("ECHO", "é", b"\x00\xff")) == (
        b"*3\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n$2\r\n\x00\xff\r\n"
    )


def test_url_forms() -> None:
    assert parse_url("redis://bob:p%40ss@cache.local:7000/3") == RespOptions(
        "cache.local", 7000, username="bob", password="p@ss", db=3
    )
    assert parse_url("rediss://:pw@cache.local") == RespOptions(
        "cache.local", 6379, tls=True, password="pw"
    )
    assert parse_url("unix://:pw@/run/redis.sock?db=2&socket_timeout=0.25") == RespOptions(
        unix_path="/run/redis.sock", password="pw", db=2, socket_timeout=0.25
    )
    plain = parse_url("redis://127.0.0.1?socket_connect_timeout=5")
    assert (plain.db, plain.socket_timeout, plain.socket_connect_timeout) == (0, 0.5, 5.0)


def test_unknown_url_option_is_a_config_error_naming_the_supported_ones() -> None:
    with pytest.raises(ConfigError, match=r"'max_connections'.*socket_timeout, socket_conn"):
        RespClient.from_url("redis://127.0.0.1/0?max_connections=16")
    with pytest.raises(ConfigError, match=r"^limits.store: .*'retry'"):
        store_from_url("redis://127.0.0.1/0?key_prefix=a:&retry=1")


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1/x",
        "redis://127.0.0.1:port/0",
        "redis://127.0.0.1/0?socket_timeout=0",
        "redis://127.0.0.1/0?socket_timeout=soon",
        "redis://bob@127.0.0.1/0",
        "unix://?db=1",
        "unix:///tmp/r.sock?db=one",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)


def test_the_password_stays_out_of_repr_and_errors() -> None:
    options = parse_url("redis://:hunter2@127.0.0.1/0")
    assert "hunter2" not in repr(options)
    with pytest.raises(ConfigError) as error:
        parse_url("redis://:hunter2@127.0.0.1/0?bogus=1")
    assert "hunter2" not in str(error.value)


def test_a_new_connection_authenticates_then_selects_the_db() -> None:
    assert handshake_commands(parse_url("redis://u:p@h/4")) == [("AUTH", "u", "p"), ("SELECT", 4)]
    assert handshake_commands(parse_url("redis://:p@h/0")) == [("AUTH", "p")]
    assert handshake_commands(parse_url("redis://h")) == []


# --- against a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """For tests that leave the server as it was (distinct keys, no kills)."""
    server = start_or_skip(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
async def client(shared_server: RedisServer) -> AsyncIterator[RespClient]:
    client = RespClient.from_url(shared_server.url)
    yield client
    await client.close()


@pytest.fixture
async def helper(shared_server: RedisServer) -> AsyncIterator[RespClient]:
    """A second connection, to act on the server while `client` waits."""
    helper = RespClient.from_url(shared_server.url)
    yield helper
    await helper.close()


async def client_count(client: RespClient) -> int:
    listing = await client.call("CLIENT", "LIST")
    return len(listing.decode().strip().splitlines())


async def until(predicate: Any, timeout: float = 2.0) -> None:
    """Wait for a server-side condition (polling the server, not timing a behaviour)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.redis
async def test_pipelined_concurrent_calls_each_get_their_own_reply(
    client: RespClient,
) -> None:
    counts = await asyncio.gather(*(client.call("INCR", "resp:pipelined") for _ in range(200)))
    assert counts == list(range(1, 201))  # one FIFO connection: replies in the order sent
    await client.call_many([("SET", f"resp:own:{i}", i) for i in range(50)])
    values = await asyncio.gather(*(client.call("GET", f"resp:own:{i}") for i in range(50)))
    assert values == [str(i).encode() for i in range(50)]


@pytest.mark.redis
async def test_concurrent_first_calls_share_one_connect(own_server: RedisServer) -> None:
    client = RespClient.from_url(own_server.url)  # alone on its server: CLIENT LIST is ours
    try:
        assert await asyncio.gather(*(client.call("PING") for _ in range(50))) == ["PONG"] * 50
        assert await client_count(client) == 1
    finally:
        await client.close()


@pytest.mark.redis
async def test_an_error_reply_raises_and_later_replies_stay_in_step(client: RespClient) -> None:
    with pytest.raises(RespError, match="wrong number of arguments"):
        await client.call("INCR")
    with pytest.raises(RespError, match="not an integer"):
        await client.call_many([("SET", "resp:err", "x"), ("INCR", "resp:err")])
    assert await client.call("ECHO", "still in step") == b"still in step"


@pytest.mark.redis
async def test_evalsha_loads_a_script_redis_does_not_have(client: RespClient) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await client.evalsha(script, ["resp:script"], [2]) == 2
    await client.call("SCRIPT", "FLUSH")
    assert await client.evalsha(script, ["resp:script"], [3]) == 5  # ran exactly once more
    assert await client.call("SCRIPT", "EXISTS", script.sha) == [1]
    with pytest.raises(RespError, match="user_script"):
        await client.evalsha(Script("return redis.call('NOPE')"), [], [])


@pytest.mark.redis
async def test_password_in_the_url_is_sent_before_any_command(tmp_path: Path) -> None:
    server = start_or_skip(tmp_path / "redis", ["--requirepass", "s3cret"])
    base = f"127.0.0.1:{server.port}/0"
    clients = [
        RespClient.from_url(f"redis://{auth}@{base}") for auth in (":s3cret", "default:s3cret")
    ]
    wrong, none = RespClient.from_url(f"redis://:guess@{base}"), RespClient.from_url(server.url)
    try:
        assert [await c.call("PING") for c in clients] == ["PONG", "PONG"]
        with pytest.raises(RespConnectionError, match="AUTH refused: WRONGPASS") as refused:
            await wrong.call("PING")
        assert "guess" not in str(refused.value)
        with pytest.raises(RespError, match="NOAUTH"):
            await none.call("PING")
    finally:
        for c in [*clients, wrong, none]:
            await c.close()
        server.stop()


@pytest.mark.redis
async def test_db_in_the_url_is_selected(shared_server: RedisServer) -> None:
    db3 = RespClient.from_url(f"redis://127.0.0.1:{shared_server.port}/3")
    db0 = RespClient.from_url(shared_server.url)
    try:
        await db3.call("SET", "resp:db", "three")
        assert await db0.call("GET", "resp:db") is None
        assert await db3.call("GET", "resp:db") == b"three"
    finally:
        await db3.close()
        await db0.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="resp"))
    yield path
    shutil.rmtree(path)


@pytest.mark.redis
async def test_unix_socket_url(tmp_path: Path, short_dir: Path) -> None:
    path = short_dir / "redis.sock"
    server = start_or_skip(tmp_path / "redis", ["--unixsocket", str(path)])
    over_unix = RespClient.from_url(f"unix://{path}?db=1")
    over_tcp = RespClient.from_url(f"redis://127.0.0.1:{server.port}/1")
    try:
        await over_unix.call("SET", "resp:unix", "yes")
        assert await over_tcp.call("GET", "resp:unix") == b"yes"
        assert b"addr=/" in await over_unix.call("CLIENT", "INFO")  # really the socket
    finally:
        await over_unix.close()
        await over_tcp.close()
        server.stop()


@pytest.mark.redis
async def test_rediss_url_speaks_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = write_self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # ssl.create_default_context trusts it
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    try:
        server = start_or_skip(tmp_path / "redis", [*tls, "--tls-auth-clients", "no"])
    except RuntimeError:
        pytest.skip("this Redis binary has no TLS support")
    client = RespClient.from_url(f"rediss://localhost:{tls_port}/0")
    try:
        assert await client.call("PING") == "PONG"  # the TLS port answers TLS only
    finally:
        await client.close()
        server.stop()


@pytest.mark.redis
async def test_no_reply_within_socket_timeout_fails_every_call_in_flight_never_resent(
    shared_server: RedisServer, helper: RespClient
) -> None:
    client = RespClient.from_url(f"{shared_server.url}?socket_timeout=0.2")
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            client.call("BLPOP", "resp:timeout", 5),  # blocks server-side: no reply
            client.call("INCR", "resp:timeout:n"),  # queued behind it
            return_exceptions=True,
        )
        assert 0.15 < time.monotonic() - started < 1.0
        assert all(isinstance(o, RespConnectionError) for o in outcomes), outcomes
        assert "no reply within 0.2s" in str(outcomes[0])
        await helper.call("LPUSH", "resp:timeout", "item")
        # A resent BLPOP would have taken the item (or blocked this call past its timeout).
        assert await client.call("LLEN", "resp:timeout") == 1
    finally:
        await client.close()


@pytest.mark.redis
async def test_a_dropped_connection_fails_calls_in_flight_and_never_resends(
    client: RespClient, helper: RespClient
) -> None:
    first_id = await client.call("CLIENT", "ID")
    waiting = asyncio.ensure_future(client.call("BLPOP", "resp:dropped", 5))

    async def blocked() -> bool:
        return b"blocked_clients:1" in await helper.call("INFO", "clients")

    await until(blocked)
    await helper.call("CLIENT", "KILL", "ID", first_id)
    with pytest.raises(RespConnectionError, match="connection lost"):
        await waiting
    await helper.call("LPUSH", "resp:dropped", "item")
    assert await client.call("LLEN", "resp:dropped") == 1  # the BLPOP was not sent again
    assert await client.call("CLIENT", "ID") != first_id


@pytest.mark.redis
async def test_a_cancelled_caller_does_not_shift_later_replies(client: RespClient) -> None:
    await client.call("PING")
    tasks = [asyncio.ensure_future(client.call("INCR", f"resp:cancel:{i}")) for i in range(20)]
    await asyncio.sleep(0)  # every task has queued its command and waits for the reply
    for task in tasks[::2]:
        task.cancel()
    kept = await asyncio.gather(*tasks[1::2])
    assert kept == [1] * 10
    assert all(task.cancelled() for task in tasks[::2])
    assert await client.call("ECHO", "next") == b"next"
    # The cancelled commands had been sent: they ran, their replies were dropped.
    values = await client.call("MGET", *(f"resp:cancel:{i}" for i in range(20)))
    assert values == [b"1"] * 20


@pytest.mark.redis
async def test_a_server_restart_between_calls_costs_no_error(own_server: RedisServer) -> None:
    client = RespClient.from_url(own_server.url)
    try:
        await client.call("SET", "resp:restart", "before")
        own_server.stop()
        own_server.start()  # no event loop turn in between: the old socket is stale
        assert await client.call("GET", "resp:restart") is None  # a new, empty server
    finally:
        await client.close()


@pytest.mark.redis
async def test_calls_fail_while_the_server_is_down_then_work_again(
    own_server: RedisServer,
) -> None:
    client = RespClient.from_url(own_server.url)
    try:
        await client.call("PING")
        own_server.stop()
        with pytest.raises(RespConnectionError):
            await client.call("PING")
        with pytest.raises(RespConnectionError, match="cannot connect"):
            await client.call("PING")
        own_server.start()
        assert await client.ping() == "PONG"
    finally:
        await client.close()


@pytest.mark.redis
async def test_close_fails_calls_in_flight_and_refuses_later_ones(
    shared_server: RedisServer, client: RespClient
) -> None:
    await client.call("PING")
    in_flight = asyncio.ensure_future(client.call("BLPOP", "resp:close", 5))
    connecting = RespClient.from_url(shared_server.url)
    first_call = asyncio.ensure_future(connecting.call("PING"))
    await asyncio.sleep(0)
    await connecting.close()  # while it connects
    await client.close()
    for call in (in_flight, first_call, client.call("PING"), connecting.call("PING")):
        with pytest.raises(RespConnectionError, match="client closed"):
            await call


async def test_nothing_listening_is_a_connection_error() -> None:
    client = RespClient.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RespConnectionError, match="cannot connect"):
        await client.call("PING")
    await client.close()


def write_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost that is its own CA, and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
