"""Redis URLs: what each form means, checked without connecting (the config does it on load).

    redis://[[user]:password@]host[:port][/db]            one server
    rediss://...                                          one server, TLS
    unix://[[user]:password@]/path/to.sock?db=N           one server, unix socket
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name?db=N
    rediss+sentinel://...                                 Sentinel, TLS to sentinels and master
    redis+cluster://[[user]:password@]host[:port][,host[:port]...]
    rediss+cluster://...                                  Cluster, TLS to every node

Query options (any other is a ConfigError): socket_timeout, socket_connect_timeout (seconds);
`db` for unix:// and Sentinel; the TLS ones for rediss* (ssl_ca_certs, ssl_certfile,
ssl_keyfile, ssl_cert_reqs=required|none, ssl_check_hostname=true|false,
ssl_server_hostname; redis-py's names); sentinel_username and sentinel_password for
Sentinel (the URL's user and password are the master's). Sentinels listen on 26379 by
default, the others on 6379. Percent-encode what a user name or password holds of `@ : / ?
# % ,` (`p%40ss` for `p@ss`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from llmserve.errors import ConfigError
from llmserve.masking import mask_url_credentials

# A limiter must answer fast even when Redis does not: a call waits at most this long for
# its reply. Connecting gets longer: it happens once, on a possibly busy event loop.
DEFAULT_SOCKET_TIMEOUT = 0.5  # seconds
DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
URL_SCHEMES = SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
_TLS_SCHEMES = ("rediss", "rediss+sentinel", "rediss+cluster")

_TIMEOUT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_server_hostname",
)
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class RespOptions:
    """How to reach and talk to one server."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    unix_path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # TLS (rediss*): trust only this CA file (default: the system's CAs); present this client
    # certificate and key (mutual TLS); verify the server's certificate (`none`: accept any)
    # and its name, which is ssl_server_hostname when given, else the host connected to.
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: Literal["required", "none"] = "required"
    ssl_check_hostname: bool = True
    ssl_server_hostname: str | None = None

    @property
    def where(self) -> str:
        """The server, for messages (never the password)."""
        return self.unix_path or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SentinelOptions:
    """A master found through Sentinel: ask the sentinels, then connect with `master`."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    master: RespOptions  # credentials, db, TLS, timeouts (host and port: found at run time)
    sentinel: RespOptions  # how to talk to a sentinel (sentinel_username/password, TLS)

    @property
    def where(self) -> str:
        return f"{self.service_name} via sentinels {_addresses(self.sentinels)}"


@dataclass(frozen=True)
class ClusterOptions:
    """A Redis Cluster: `nodes` are where to read the slot map first; `node` is how to talk
    to any node (credentials, TLS, timeouts)."""

    nodes: tuple[tuple[str, int], ...]
    node: RespOptions

    @property
    def where(self) -> str:
        return f"cluster {_addresses(self.nodes)}"


RedisUrl = RespOptions | SentinelOptions | ClusterOptions


def parse_any_url(url: str) -> RedisUrl:
    """Any form of the module docstring; ConfigError naming what is wrong."""
    scheme = _split(url).scheme
    if scheme in SENTINEL_SCHEMES:
        return parse_sentinel_url(url)
    if scheme in CLUSTER_SCHEMES:
        return parse_cluster_url(url)
    return parse_url(url)


def parse_url(url: str) -> RespOptions:
    """`redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS), or
    `unix://[[user]:password@]/path/to.sock?db=N`; query options: see the module docstring.
    """
    parts = _split(url)
    if parts.scheme not in SINGLE_SCHEMES:
        raise ConfigError(
            f"Redis URL must start {', '.join(s + '://' for s in URL_SCHEMES)}, "
            f"not {mask_url_credentials(url)!r}"
        )
    tls = parts.scheme == "rediss"
    query = _query(parts, ("db",) if parts.scheme == "unix" else (), tls)
    common = {**_credentials(parts.username, parts.password), **_options(query)}
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError("a unix:// Redis URL needs a socket path: unix:///path/to.sock")
        return RespOptions(unix_path=unquote(parts.path), db=_db(query.get("db", "0")), **common)
    host, port = parts.hostname or "localhost", _port(parts)
    db = _db(parts.path.lstrip("/") or "0")
    return RespOptions(host, port, tls=tls, db=db, **common)


def parse_sentinel_url(url: str) -> SentinelOptions:
    """`redis+sentinel://[[user]:password@]host[:port][,...]/service_name?db=N&...`."""
    parts = _split(url)
    tls = parts.scheme == "rediss+sentinel"
    query = _query(parts, ("db", *_SENTINEL_OPTIONS), tls)
    userinfo, hosts = _split_netloc(parts)
    sentinels = _host_list(hosts, DEFAULT_SENTINEL_PORT, "sentinel")
    service = unquote(parts.path.strip("/"))
    if not service or "/" in service:
        raise ConfigError(
            "a Sentinel URL names the master's service after the sentinels: "
            "redis+sentinel://host:26379,host2:26379/mymaster"
        )
    common = _options(query)
    master = RespOptions(tls=tls, db=_db(query.get("db", "0")), **common, **userinfo)
    sentinel_auth = _credentials(query.get("sentinel_username"), query.get("sentinel_password"))
    sentinel = RespOptions(tls=tls, **common, **sentinel_auth)
    return SentinelOptions(sentinels, service, master, sentinel)


def parse_cluster_url(url: str) -> ClusterOptions:
    """`redis+cluster://[[user]:password@]host[:port][,host[:port]...]` (no database: a
    cluster has only 0)."""
    parts = _split(url)
    tls = parts.scheme == "rediss+cluster"
    query = _query(parts, (), tls)
    userinfo, hosts = _split_netloc(parts)
    nodes = _host_list(hosts, DEFAULT_PORT, "cluster node")
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError("Redis Cluster has only database 0: leave the path out of the URL")
    return ClusterOptions(nodes, RespOptions(tls=tls, **_options(query), **userinfo))


# --- helpers ----------------------------------------------------------------------------


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced [ of an IPv6 address
        raise ConfigError(f"invalid Redis URL {mask_url_credentials(url)!r}: {exc}") from None


def _addresses(nodes: Iterable[tuple[str, int]]) -> str:
    return ",".join(f"{host}:{port}" for host, port in nodes)


def _query(parts: SplitResult, extra: tuple[str, ...], tls: bool) -> dict[str, str]:
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    supported = (*extra, *_TIMEOUT_OPTIONS, *(_TLS_OPTIONS if tls else ()))
    for name in query:
        if name in ("ssl", "tls"):  # other clients' switch: here the scheme says it
            raise ConfigError(
                f"Redis URL option {name!r}: TLS is chosen by the scheme, rediss://, "
                "rediss+sentinel:// (the sentinels and the master) or rediss+cluster://"
            )
        if name in _TLS_OPTIONS and not tls:
            raise ConfigError(
                f"Redis URL option {name!r} needs TLS: rediss://, rediss+sentinel:// or "
                "rediss+cluster://"
            )
        if name not in supported:
            raise ConfigError(
                f"Redis URL option {name!r} is not supported; supported: {', '.join(supported)}"
            )
    return query


def _credentials(username: str | None, password: str | None) -> dict[str, Any]:
    username = unquote(username) if username else None
    password = unquote(password) if password else None
    if username and password is None:
        raise ConfigError("a Redis URL with a user needs its password: redis://user:password@host")
    return {"username": username, "password": password}


def _split_netloc(parts: SplitResult) -> tuple[dict[str, Any], str]:
    """The credentials ({username, password}) and the host list of a multi-host URL."""
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        return _credentials(None, None), hosts
    username, colon, password = userinfo.partition(":")
    return _credentials(username or None, password if colon else None), hosts


def _host_list(text: str, default_port: int, what: str) -> tuple[tuple[str, int], ...]:
    nodes = tuple(_host_port(item, default_port, what) for item in text.split(",") if item)
    if not nodes:
        raise ConfigError(f"a Redis URL needs at least one {what}: host:port[,host:port...]")
    return nodes


def _host_port(item: str, default_port: int, what: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = item.partition(":")
    if not host or (port_text and not port_text.isdigit()) or int(port_text or 1) > 65535:
        raise ConfigError(f"Redis URL has an invalid {what} address: {item!r}")
    return host, int(port_text) if port_text else default_port


def _options(query: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {
        name: _seconds(name, query[name]) for name in _TIMEOUT_OPTIONS if name in query
    }
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_server_hostname"):
        if name in query:
            if not query[name]:
                raise ConfigError(f"Redis URL option {name} needs a value")
            options[name] = query[name]
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ConfigError("Redis URL option ssl_keyfile needs ssl_certfile (the client cert)")
    if "ssl_cert_reqs" in query:
        if query["ssl_cert_reqs"] not in ("required", "none"):
            raise ConfigError("Redis URL option ssl_cert_reqs must be `required` or `none`")
        options["ssl_cert_reqs"] = query["ssl_cert_reqs"]
    if "ssl_check_hostname" in query:
        options["ssl_check_hostname"] = _flag("ssl_check_hostname", query["ssl_check_hostname"])
    return options


def _flag(name: str, text: str) -> bool:
    value = text.lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ConfigError(f"Redis URL option {name} must be true or false")


def _port(parts: SplitResult) -> int:
    try:
        return parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError(
            f"Redis URL has an invalid port: {parts.netloc.rpartition('@')[2]}"
        ) from None


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"Redis URL option {name} must be a positive number of seconds")
    return value


def _db(text: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"Redis URL database must be a number (0, 1, ...), not {text!r}")
    return int(text)
