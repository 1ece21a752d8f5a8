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
    token: str | None = None  # bearer token for the event endpoints; None: no authentication


@dataclasses.dataclass(frozen=True)
class Settings:
    receiver: ReceiverSettings = ReceiverSettings()
    engine: EngineSettings = EngineSettings()
    state_dir: pathlib.Path = pathlib.Path('.reponotify')
