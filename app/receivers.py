"""Which addresses may receive webhooks, checked when a job names its URL and again on every connection.

A webhook makes this service send requests wherever a tenant says, and the receiver's status lands in the
tenant's event log: without a check that is a port scanner for the service's own network. Link-local
(cloud metadata lives there), unspecified, multicast and reserved addresses are refused always. Loopback
and private ranges are refused too, except on the embedded default (development, where the receiver is
usually on the same laptop) or when the operator sets `DISTILL_WEBHOOK_ALLOW_PRIVATE`.

The check that counts runs at connect time, on the very addresses the socket is opened to: the name is
resolved once, there, so a DNS answer that changes after the first check (rebinding) changes nothing.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from app.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Metadata services outside the link-local range; 169.254.169.254 and friends are link-local already.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this host" on some stacks; never a remote receiver
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ReceiverBlocked(Exception):
    """Raised instead of connecting; deliberately not an httpx error, so it is never retried."""


def private_allowed(settings: Settings) -> bool:
    return settings.environment == "development" or settings.webhook_allow_private


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order (tests replace this function)."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _as_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is what the packets reach;
    Python's range checks look only at the IPv6 form (`::ffff:127.0.0.1` is not loopback to them)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def refusal(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why `ip` may not receive webhooks ("a ... address"), or None."""
    target = _as_ipv4(ip)
    # ::1 sits inside the reserved ::/8, but it is this host: loopback, like 127.0.0.1
    if not target.is_loopback and (
        target.is_link_local
        or target.is_unspecified
        or target.is_multicast
        or target.is_reserved
        or target in METADATA_ADDRESSES
        or (isinstance(target, ipaddress.IPv4Address) and target in THIS_NETWORK)
    ):
        return "a link-local, metadata, unspecified, multicast or reserved address"
    site_local = isinstance(target, ipaddress.IPv6Address) and target.is_site_local  # fec0::/10, obsolete
    if (target.is_loopback or not target.is_global or site_local) and not allow_private:
        return "a loopback or private address (allowed only with DISTILL_WEBHOOK_ALLOW_PRIVATE)"
    return None


def host_refusal(host: str, addresses: list[IPAddress], *, allow_private: bool) -> str | None:
    """Why `host` may not receive webhooks when it resolves to `addresses`, or None. One bad answer
    refuses the name, so the order in which a resolver returns them cannot matter."""
    for ip in addresses:
        reason = refusal(ip, allow_private=allow_private)
        if reason is not None:
            literal = host.strip("[]") == str(ip)
            return f"{host} is {reason}" if literal else f"{host} resolves to {ip}, {reason}"
    return None


def url_refusal(url: str, *, allow_private: bool) -> str | None:
    """Why a job may not name `url` as its webhook, or None. A name that does not resolve yet is let
    through: the connect-time check refuses it later if it ever resolves somewhere it must not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "only http(s) URLs with a host"
    try:
        addresses = resolve(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError, ValueError):
        return None
    return host_refusal(parts.hostname, addresses, allow_private=allow_private)


class GuardedBackend(httpcore.NetworkBackend):
    """Opens TCP connections only to addresses `refusal` allows; TLS still verifies the URL's name."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._tcp = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError, ValueError) as exc:  # an httpcore error: httpx retries it as usual
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        reason = host_refusal(host, addresses, allow_private=self.allow_private)
        if reason is not None:
            raise ReceiverBlocked(f"blocked: {reason}")
        error: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for ip in addresses:
            try:
                return self._tcp.connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    def sleep(self, seconds: float) -> None:
        self._tcp.sleep(seconds)


def guarded_transport(*, allow_private: bool) -> httpx.HTTPTransport:
    """httpx's own transport, whose connection pool opens sockets through `GuardedBackend`. httpx has no
    public way to pass a network backend, so the pool it built is swapped for the same pool with ours.
    A transport given explicitly also keeps httpx from using a proxy from the environment, behind which
    the checked address would be the proxy's, not the receiver's."""
    transport = httpx.HTTPTransport()
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=100,  # httpx's default limits
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=GuardedBackend(allow_private=allow_private),
    )
    return transport
