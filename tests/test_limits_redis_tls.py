"""Redis over TLS with a private CA: the CA file, a client certificate (mutual TLS), the
server's name, and what each refusal looks like; the limiter and the key store over it, on one
server, on a cluster, and behind sentinels that speak only TLS (through a failover too)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmserve.limits.stores.cluster import ClusterClient
from llmserve.limits.stores.resp import (
    RespClient,
    RespConnectionError,
    RespNotSent,
    client_from_url,
)
from llmserve.limits.stores.sentinel import SentinelClient
from tests.support.redis_server import (
    ClusterNodes,
    RedisServer,
    SentinelGroup,
    ServerTls,
    binary_or_skip,
    start_or_skip,
    write_replicated,
)
from tests.support.redis_workout import key_store_workout, limiter_workout
from tests.support.tls import TestCA

pytestmark = pytest.mark.redis
SERVER_NAME = "redis.internal"  # the only name in the server's certificate


@dataclass
class TlsSetup:
    server: RedisServer
    ca: TestCA
    client_cert: Path
    client_key: Path
    other_ca: TestCA  # signed nothing the server has

    def url(self, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"rediss://127.0.0.1:{self.server.port}/0?{query}"

    def mutual(self, **options: str) -> dict[str, str]:
        """The options of a client that trusts the CA and presents its certificate."""
        return {"ssl_ca_certs": str(self.ca.cert), "ssl_certfile": str(self.client_cert),
                "ssl_keyfile": str(self.client_key), "ssl_server_hostname": SERVER_NAME,
                **options}  # fmt: skip


@pytest.fixture(scope="module")
def tls_cluster(tls: TlsSetup) -> Iterator[ClusterNodes]:
    directory = tls.client_cert.parent.parent / "cluster"
    cert, key = tls.ca.issue("cluster-node", dns=[SERVER_NAME])
    nodes = ClusterNodes.start_new(
        directory, binary_or_skip(), tls=ServerTls(cert, key, tls.ca.cert)
    )
    yield nodes
    nodes.stop()


@pytest.fixture
def tls_sentinels(tls: TlsSetup, tmp_path: Path) -> Iterator[SentinelGroup]:
    cert, key = tls.ca.issue("sentinel-group", dns=[SERVER_NAME])  # sentinels and servers
    group = SentinelGroup.start_new(
        tmp_path / "sentinel", binary_or_skip(), tls=ServerTls(cert, key, tls.ca.cert)
    )
    yield group
    group.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    directory = tmp_path_factory.mktemp("tls")
    ca = TestCA.create(directory / "ca")
    cert, key = ca.issue("server", dns=[SERVER_NAME])
    client_cert, client_key = ca.issue("llmserve-client")
    try:
        server = start_or_skip(directory / "redis", tls=ServerTls(cert, key, ca.cert))
    except RuntimeError:
        pytest.skip("this Redis binary has no TLS support")
    yield TlsSetup(server, ca, client_cert, client_key, TestCA.create(directory / "other"))
    server.stop()


async def ping(url: str) -> str:
    client = RespClient.from_url(url)
    try:
        return await client.ping()
    finally:
        await client.close()


async def test_mutual_tls_with_a_private_ca_and_a_server_name(tls: TlsSetup) -> None:
    client = RespClient.from_url(tls.url(**tls.mutual()))
    try:
        assert await client.ping() == "PONG"
        info = await client.call("CLIENT", "INFO")
        assert b"laddr=127.0.0.1:" + str(tls.server.port).encode() in info  # the TLS port
    finally:
        await client.close()
    # without the key file: the key is read from the certificate file
    combined = tls.client_cert.parent / "combined.pem"
    combined.write_bytes(tls.client_cert.read_bytes() + tls.client_key.read_bytes())
    options = tls.mutual(ssl_certfile=str(combined))
    del options["ssl_keyfile"]
    assert await ping(tls.url(**options)) == "PONG"


async def test_the_limiter_and_the_key_store_work_over_tls(tls: TlsSetup) -> None:
    await limiter_workout(tls.url(**tls.mutual()))
    await key_store_workout(tls.url(**tls.mutual()))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"ssl_ca_certs": "other"}, "certificate verify failed"),  # not our CA
        ({"ssl_ca_certs": None}, "certificate verify failed"),  # the system's CAs only
        ({"ssl_server_hostname": None}, "IP address mismatch"),  # asked for 127.0.0.1
        ({"ssl_server_hostname": "cache.internal"}, "Hostname mismatch"),
    ],
)
async def test_a_server_certificate_that_does_not_verify_is_refused(
    tls: TlsSetup, change: dict[str, str | None], error: str
) -> None:
    options = tls.mutual()
    for name, value in change.items():
        if value is None:
            del options[name]
        else:
            options[name] = str(tls.other_ca.cert) if value == "other" else value
    with pytest.raises(RespNotSent, match=error):  # never connected: nothing was sent
        await ping(tls.url(**options))


async def test_checks_turned_off_accept_the_same_server(tls: TlsSetup) -> None:
    no_name = tls.mutual(ssl_check_hostname="false")
    del no_name["ssl_server_hostname"]
    assert await ping(tls.url(**no_name)) == "PONG"  # the CA still checked
    anything = tls.mutual(ssl_cert_reqs="none", ssl_ca_certs=str(tls.other_ca.cert))
    assert await ping(tls.url(**anything)) == "PONG"


async def test_the_server_refuses_a_client_without_a_certificate(tls: TlsSetup) -> None:
    options = tls.mutual()
    del options["ssl_certfile"], options["ssl_keyfile"]
    with pytest.raises(RespConnectionError):
        await ping(tls.url(**options))
    other_cert, other_key = tls.other_ca.issue("stranger")  # a certificate of another CA
    with pytest.raises(RespConnectionError):
        await ping(tls.url(**tls.mutual(ssl_certfile=str(other_cert), ssl_keyfile=str(other_key))))


async def test_a_cluster_over_tls_routes_to_the_tls_ports(
    tls: TlsSetup, tls_cluster: ClusterNodes
) -> None:
    query = "&".join(f"{k}={v}" for k, v in tls.mutual().items())
    url = f"{tls_cluster.tls_url}?{query}"
    await limiter_workout(url, principal="tls-cluster")
    await key_store_workout(url)
    client = client_from_url(url)
    assert isinstance(client, ClusterClient)
    try:
        await client.ping()  # the slot map, read over TLS, names the nodes' TLS ports
        assert {port for _, port in client._masters} == set(tls_cluster.tls_ports.values())
    finally:
        await client.close()


async def test_sentinels_over_tls_lead_to_the_master_over_tls_through_a_failover(
    tls: TlsSetup, tls_sentinels: SentinelGroup
) -> None:
    group = tls_sentinels
    url = group.url + "?" + "&".join(f"{k}={v}" for k, v in tls.mutual().items())
    await limiter_workout(url, principal="tls-sentinel")
    await key_store_workout(url)
    # The URL's TLS options are the sentinels' too: without the name, a sentinel is refused.
    no_name = tls.mutual()
    del no_name["ssl_server_hostname"]
    refused = client_from_url(group.url + "?" + "&".join(f"{k}={v}" for k, v in no_name.items()))
    try:
        with pytest.raises(RespNotSent, match=r"no sentinel named it.*IP address mismatch"):
            await refused.ping()
    finally:
        await refused.close()

    client = client_from_url(url)
    assert isinstance(client, SentinelClient)
    replica = group.tls_ports[group.servers[1].port]
    try:
        assert await write_replicated(client, "llmserve:tls-sentinel", "before")  # replica too
        assert client.master_address == ("127.0.0.1", group.master_port())  # its TLS port
        group.kill_master()
        deadline = time.monotonic() + 15
        while True:  # refused until a sentinel names the promoted replica
            try:
                assert await client.call("GET", "llmserve:tls-sentinel") == b"before"
                break
            except RespConnectionError:
                assert time.monotonic() < deadline, "no master reached over TLS within 15 s"
                await asyncio.sleep(0.05)
        assert client.master_address == ("127.0.0.1", replica)  # over TLS, on its TLS port
    finally:
        await client.close()
