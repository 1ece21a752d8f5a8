"""
Runtime settings shared by both front ends, filled from the command line.

Every option has an environment variable ``REPONOTIFY_<OPTION>`` (see
:mod:`reponotify.cli`), so containers and the Helm chart configure it the same way.
"""
import dataclasses
import pathlib

from reponotify.engine import EngineSettings


@dataclasses.dataclass(frozen=True)
class ReceiverSettings:
    host: str = '0.0.0.0'
    port: int = 8080
    token: str | None = dataclasses.field(default=None, repr=False)  # bearer token for event endpoints
    hmac_secret: str | None = dataclasses.field(default=None, repr=False)  # X-Signature: sha256=<hmac> secret
    read_timeout: float = 10.0  # seconds to receive a request body


@dataclasses.dataclass(frozen=True)
class Settings:
    receiver: ReceiverSettings = ReceiverSettings()
    engine: EngineSettings = EngineSettings()
    state_dir: pathlib.Path = pathlib.Path('.reponotify')
    shutdown_grace: float = 10.0  # seconds in-flight attempts may finish after SIGTERM
