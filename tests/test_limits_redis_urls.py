"""Redis URL forms for production (TLS options, Sentinel, Cluster), checked without a server:
what each parses to, what is refused, the cluster's key slots, `${VAR}` credentials."""

from __future__ import annotations

import binascii
from pathlib import Path

import pytest

from llmserve.auth import store_url
from llmserve.auth.redis_store import RedisKeyStore
from llmserve.auth.store import key_store_from_url
from llmserve.config import parse_config
from llmserve.errors import ConfigError
from llmserve.limits.stores import store_from_url
from llmserve.limits.stores.cluster import ClusterClient, command_slot, key_slot
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.stores.resp import RespClient, client_from_url
from llmserve.limits.stores.sentinel import SentinelClient
from llmserve.limits.stores.urls import (
    URL_SCHEMES,
    ClusterOptions,
    RespOptions,
    SentinelOptions,
    parse_any_url,
    parse_url,
)
from llmserve.masking import mask_url_credentials
from tests.support.tls import TestCA


def test_tls_options_follow_redis_py_names() -> None:
    url = (
        "rediss://app:pw@10.0.0.5:6380/1?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/etc/c.pem"
        "&ssl_keyfile=/etc/c.key&ssl_server_hostname=redis.internal&ssl_check_hostname=false"
    )
    assert parse_url(url) == RespOptions(
        "10.0.0.5", 6380, tls=True, username="app", password="pw", db=1,
        ssl_ca_certs="/etc/ca.pem", ssl_certfile="/etc/c.pem", ssl_keyfile="/etc/c.key",
        ssl_server_hostname="redis.internal", ssl_check_hostname=False,
    )  # fmt: skip
    assert parse_url("rediss://h?ssl_cert_reqs=none").ssl_cert_reqs == "none"
    assert parse_url("rediss://h").ssl_cert_reqs == "required"


def test_sentinel_url() -> None:
    options = parse_any_url(
        "redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/mymaster?db=2&socket_timeout=0.25"
        "&sentinel_username=watch&sentinel_password=spw"
    )
    assert isinstance(options, SentinelOptions)
    assert options.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert options.service_name == "mymaster"
    master, sentinel = options.master, options.sentinel
    assert (master.username, master.password, master.db, master.socket_timeout) == (
        "app", "p@ss", 2, 0.25
    )  # fmt: skip
    assert (sentinel.username, sentinel.password, sentinel.db) == ("watch", "spw", 0)
    assert sentinel.socket_timeout == 0.25 and not master.tls
    tls = parse_any_url("rediss+sentinel://s1/m?ssl_ca_certs=/ca.pem")
    assert isinstance(tls, SentinelOptions)
    assert tls.master.tls and tls.sentinel.tls and tls.sentinel.ssl_ca_certs == "/ca.pem"


def test_cluster_url() -> None:
    options = parse_any_url("redis+cluster://:pw@n1:7000,n2:7001,n3?socket_connect_timeout=1")
    assert options == ClusterOptions(
        (("n1", 7000), ("n2", 7001), ("n3", 6379)),
        RespOptions(password="pw", socket_connect_timeout=1.0),
    )
    assert isinstance(parse_any_url("rediss+cluster://n1:7000/"), ClusterOptions)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?ssl_ca_certs=/ca.pem", "needs TLS"),
        ("redis+cluster://h?ssl_certfile=/c.pem", "needs TLS"),
        ("redis+sentinel://s1/m?ssl=true", "TLS is chosen by the scheme"),
        ("rediss://h/0?ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
        ("rediss://h/0?ssl_cert_reqs=optional", "`required` or `none`"),
        ("rediss://h/0?ssl_check_hostname=maybe", "true or false"),
        ("rediss://h/0?ssl_ca_certs=", "needs a value"),
        ("redis+sentinel://s1:26379,s2:26379", "names the master's service"),
        ("redis+sentinel://s1:26379/a/b", "names the master's service"),
        ("redis+sentinel://s1/m?key=1", "'key' is not supported"),
        ("redis+sentinel://s1:port/m", "invalid sentinel address"),
        ("redis+sentinel:///m", "at least one sentinel"),
        ("redis+sentinel://s1/m?db=x", "must be a number"),
        ("redis+cluster://n1:7000/1", "only database 0"),
        ("redis+cluster://n1:70000", "invalid cluster node address"),
        ("redis+cluster://n1?db=0", "'db' is not supported"),
        ("redis+cluster://user@n1", "needs its password"),
        ("redis+cluster://[::1:7000", "invalid Redis URL"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_any_url(url)


def test_every_store_takes_every_form_and_connects_to_nothing(tmp_path: Path) -> None:
    forms = {
        "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/m?key_prefix=p:": SentinelClient,
        "redis+cluster://127.0.0.1:1,127.0.0.1:2?key_prefix=p:": ClusterClient,
        "rediss://127.0.0.1:1/0?ssl_cert_reqs=none&key_prefix=p:": RespClient,
    }
    for url, kind in forms.items():
        limits = store_from_url(url)
        keys = key_store_from_url(url)
        assert isinstance(limits, RedisStore) and isinstance(limits.client, kind)
        assert isinstance(keys, RedisKeyStore) and isinstance(keys.client, kind)
        assert keys._keys == "p:keys" and "pw" not in keys.where
    assert set(store_url.REDIS_SCHEMES) == set(URL_SCHEMES)
    for scheme in URL_SCHEMES:
        assert store_url.is_redis_url(f"{scheme}://h")


def test_a_tls_file_that_cannot_be_read_fails_when_the_store_is_made(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=f"^limits.store: Redis TLS: cannot use {missing}"):
        store_from_url(f"rediss://h/0?ssl_ca_certs={missing}")
    with pytest.raises(ConfigError, match="cannot use"):
        key_store_from_url(f"redis+cluster://h?ssl_ca_certs={missing}".replace("redis+", "rediss+"))
    ca = TestCA.create(tmp_path)  # a readable CA file: fine, nothing connects yet
    assert isinstance(client_from_url(f"rediss://h/0?ssl_ca_certs={ca.cert}"), RespClient)


def test_sentinel_password_in_the_query_is_masked() -> None:
    url = "redis+sentinel://:mpw@s1/m?sentinel_password=spw-secret&db=1"
    assert mask_url_credentials(url) == "redis+sentinel://:****@s1/m?sentinel_password=****&db=1"
    with pytest.raises(ConfigError) as caught:
        store_from_url(url + "&bogus=1")
    assert "spw-secret" not in str(caught.value) and "mpw" not in str(caught.value)


def test_key_slots_are_redis_clusters() -> None:
    assert key_slot("123456789") == 12739  # CRC16/XMODEM check value, as in the cluster spec
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == binascii.crc_hqx(b"foo{}{bar}", 0) % 16384  # empty tag
    assert key_slot("foo{}{bar}") != key_slot("bar")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")
    store = RedisStore(client_from_url("redis+cluster://h:1"), key_prefix="llmserve:limits:")
    keys = store._hold_keys("alice")
    assert {key_slot(k) for k in keys} == {key_slot("alice")}
    assert command_slot(("EVALSHA", "sha", 3, *keys, "arg")) == key_slot("alice")
    assert command_slot(("EVALSHA", "sha", 0)) is None
    assert command_slot(("HGET", "llmserve:auth:keys", "id")) == key_slot("llmserve:auth:keys")
    assert command_slot(("CONFIG", "GET", "save")) is None and command_slot(("PING",)) is None


def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_USER", "llmserve")
    monkeypatch.setenv("REDIS_PASSWORD", "p%40ss%2Fw0rd")  # percent-encoded p@ss/w0rd
    config = parse_config(
        "limits:\n"
        "  store: redis+sentinel://${REDIS_USER}:${REDIS_PASSWORD}@s1:26379/m\n"
        "auth:\n"
        "  keys: rediss://${REDIS_USER}:${REDIS_PASSWORD}@redis.internal:6380/0\n"
    )
    sentinel = parse_any_url(config.limits.store)
    assert isinstance(sentinel, SentinelOptions)
    assert (sentinel.master.username, sentinel.master.password) == ("llmserve", "p@ss/w0rd")
    single = parse_any_url(str(config.auth.keys))
    assert isinstance(single, RespOptions)
    assert (single.username, single.password, single.host) == (
        "llmserve", "p@ss/w0rd", "redis.internal"
    )  # fmt: skip
    monkeypatch.delenv("REDIS_PASSWORD")
    with pytest.raises(ConfigError, match="REDIS_PASSWORD is not set"):
        parse_config("limits:\n  store: redis://u:${REDIS_PASSWORD}@h/0\n")
