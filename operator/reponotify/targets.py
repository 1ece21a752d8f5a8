"""
The SSRF guard: which addresses deliveries may connect to.

Notification specs come from tenants, and the operator runs inside the
cluster: without a guard, a webhook URL could reach the cloud metadata service
(169.254.169.254), the API server, or any pod. So deliveries only connect to
globally routable addresses, unless the operator's ``--allow-targets`` lists a
network (CIDR) or a host name (for in-cluster targets).

The check runs inside aiohttp's connector on the addresses it is about to
connect to, after DNS resolution, so a name that resolves to a private address
is refused, and there is no window between a check and a second lookup (DNS
rebinding). IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are checked as
the IPv4 address they map. Redirects are never followed (see methods/base.py).
"""
import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import aiohttp

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(aiohttp.ClientError):
    """The target resolves only to addresses the policy refuses; the message says why."""


_LABEL = re.compile(r'(?!-)[A-Za-z0-9_-]{1,63}(?<!-)')


def is_host_name(text: str) -> bool:
    """
    Whether ``text`` is a DNS host name: dot-separated labels of letters, digits, ``-`` (not first or last)
    and ``_``, the last one not all digits, so that a mistyped address or CIDR ("127.0.0.0/88") is not one.
    """
    labels = text.rstrip('.').split('.')
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


@dataclasses.dataclass(frozen=True)
class TargetPolicy:
    """Global addresses are allowed; others only when a listed network or host name allows them."""
    allowed_networks: tuple[Network, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> 'TargetPolicy':
        """From ``--allow-targets``: comma-separated CIDRs, addresses and host names."""
        networks: list[Network] = []
        hosts: set[str] = set()
        for item in filter(None, (part.strip() for part in text.split(','))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                if not is_host_name(item):
                    raise ValueError(f"{item!r} is neither a CIDR, an address nor a host name") from None
                hosts.add(item.rstrip('.').lower())
        return cls(allowed_networks=tuple(networks), allowed_hosts=frozenset(hosts))

    def refusal(self, hostname: str, address: str) -> str | None:
        """Why connecting to ``address`` (resolved from ``hostname``) is refused, or None if allowed."""
        if hostname.rstrip('.').lower() in self.allowed_hosts:
            return None
        try:
            ip: Address = ipaddress.ip_address(address.split('%', 1)[0])
        except ValueError:
            return f"{address} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed_networks):
            return None
        kind = _non_global_kind(ip)
        if kind is None:
            return None
        return (f"target refused: {ip} is a {kind} address (an operator may allow it with --allow-targets)")


def _non_global_kind(ip: Address) -> str | None:
    if ip.is_loopback:
        return 'loopback'
    if ip.is_link_local:
        return 'link-local (cloud metadata service)' if str(ip) == '169.254.169.254' else 'link-local'
    if ip.is_unspecified:
        return 'unspecified'
    if ip.is_multicast:
        return 'multicast'
    if ip.is_private:
        return 'private'
    if not ip.is_global:
        return 'non-global'
    return None


class GuardedConnector(aiohttp.TCPConnector):
    """A connector that drops addresses the policy refuses, right before connecting."""

    def __init__(self, policy: TargetPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._policy = policy

    async def _resolve_host(self, host: str, port: int, traces: Sequence[Any] | None = None) -> list[Any]:
        # aiohttp connects to exactly these results, also for IP literals: the one place to check.
        results = await super()._resolve_host(host, port, traces=traces)
        allowed = [result for result in results if self._policy.refusal(host, result['host']) is None]
        if not allowed:
            reason = self._policy.refusal(host, results[0]['host']) if results else f"{host} did not resolve"
            raise TargetRefused(reason)
        return allowed


def delivery_session(policy: TargetPolicy | None, connections: int) -> aiohttp.ClientSession:
    """
    The HTTP client deliveries are made with: the policy's guard (if any), ``connections`` at most.

    No cookie jar: each delivery is a POST of its own, and a cookie one answer sets must not travel
    with the next event (nor cost a jar lookup per request). No proxy from the environment either.
    """
    connector = (GuardedConnector(policy, limit=connections) if policy is not None
                 else aiohttp.TCPConnector(limit=connections))
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
