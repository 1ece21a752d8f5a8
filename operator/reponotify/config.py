"""
Runtime settings shared by both front ends, filled from the command line.

Every option has an environment variable ``REPONOTIFY_<OPTION>`` (see
:mod:`reponotify.cli`), so containers and the Helm chart configure it the same way.
"""
import dataclasses
import pathlib
from collections.abc import Mapping

from reponotify.engine import EngineSettings


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """How the registry adapters (``/v1/sources/<name>``, see :mod:`reponotify.sources`) work."""
    # Docker Distribution: the registry host in docker_url, and the homepage URL ({repository}, {namespace},
    # {name}, {host} are filled in; without placeholders, "/<repository>" is appended). None: from the event.
    distribution_registry_host: str | None = None
    distribution_homepage_url: str | None = None
    # Harbor: the homepage URL, as above. None: the Harbor UI's projects page on the registry's host.
    harbor_homepage_url: str | None = None
    # Per-source credentials replacing the receiver's token and HMAC secret for that source.
    tokens: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    hmac_secrets: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    # Sources that take requests without credentials (behind something that authenticates them).
    unauthenticated: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class ReceiverSettings:
    host: str = '0.0.0.0'
    port: int = 8080
    token: str | None = dataclasses.field(default=None, repr=False)  # bearer token for event endpoints
    hmac_secret: str | None = dataclasses.field(default=None, repr=False)  # X-Signature: sha256=<hmac> secret
    read_timeout: float = 10.0  # seconds to receive a request body
    sources: SourceSettings = SourceSettings()


@dataclasses.dataclass(frozen=True)
class Settings:
    receiver: ReceiverSettings = ReceiverSettings()
    engine: EngineSettings = EngineSettings()
    state_dir: pathlib.Path = pathlib.Path('.reponotify')
    shutdown_grace: float = 10.0  # seconds in-flight attempts may finish after SIGTERM
