"""
The ``reponotify`` command.

``operator`` runs the kopf operator with the receiver in the same process;
``standalone`` runs the same core from a folder of YAML, without a cluster;
``crd`` prints the CRD; ``send`` posts an event (a command-line client);
``demo`` runs the end-to-end demo on the embedded examples.

Every option also reads ``REPONOTIFY_<OPTION>`` (``--state-dir`` and
``REPONOTIFY_STATE_DIR``), so containers and the Helm chart configure it alike.
"""
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click

from reponotify.config import ReceiverSettings, Settings, SourceSettings
from reponotify.delivery_processes import AUTO, AUTO_LIMIT, NICENESS
from reponotify.dispatcher import DispatcherSettings, parse_schedule
from reponotify.email_verification import DEFAULT_HOLD_MAX_AGE, VerificationSettings
from reponotify.engine import EngineSettings
from reponotify.eventloop import DEFAULT_EVENT_LOOP, EVENT_LOOPS, run
from reponotify.events import EVENT_NAMES, sample_payload
from reponotify.logs import LOG_FORMATS, configure_logging
from reponotify.methods.base import MethodSettings, SmtpSettings
from reponotify.sources import SOURCE_NAMES
from reponotify.sources.common import check_homepage_template, clean_host
from reponotify.targets import TargetPolicy

F = Callable[..., Any]


def option(*names: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that also reads ``REPONOTIFY_<LONG_NAME>``."""
    long_name = next(name for name in names if name.startswith('--'))
    envvar = 'REPONOTIFY_' + long_name[2:].upper().replace('-', '_')
    return click.option(*names, envvar=envvar, show_envvar=True, **kwargs)


MAX_DELIVERY_PROCESSES = 64


class ProcessCount(click.ParamType):
    """``auto``, or a number of processes from 0 to ``MAX_DELIVERY_PROCESSES``."""
    name = 'auto|N'

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        text = str(value).strip().lower()
        if text == AUTO:
            return AUTO
        if text.isascii() and text.isdigit() and int(text) <= MAX_DELIVERY_PROCESSES:  # not '\u00b2'
            return int(text)
        self.fail(f"{value!r} is not 'auto' or a number from 0 to {MAX_DELIVERY_PROCESSES}", param, ctx)


class Seconds(click.FloatRange):
    """A float range that also refuses ``nan`` (click's own lets it through: no comparison fails)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


def _schedule(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        return parse_schedule(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _policy(ctx: click.Context, param: click.Parameter, value: str) -> TargetPolicy:
    try:
        return TargetPolicy.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _state_dir(ctx: click.Context, param: click.Parameter, value: pathlib.Path) -> pathlib.Path:
    # Made here, so that a path that cannot be is one clear error, not a traceback from the first file in it.
    try:
        value.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"{value} cannot be created: {exc.strerror}") from None
    return value


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        durations = parse_schedule(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if len(durations) != 1 or durations[0] <= 0:
        raise click.BadParameter("must be one positive duration (examples: 90m, 24h)")
    return durations[0]


def _public_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ('http', 'https') or not parts.hostname or parts.query or parts.fragment:
        raise click.BadParameter("must be an http(s) URL with a host and no query, "
                                 "such as https://reponotify.example.com")
    return value.rstrip('/')


def _registry_host(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return None
    if clean_host(value) is None:
        raise click.BadParameter("must be a registry host, optionally with a port (registry.example.com:5000)")
    return value


def _homepage_template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return None
    if urlsplit(value.split('{', 1)[0]).scheme not in ('http', 'https'):
        raise click.BadParameter("must be an http(s) URL, such as https://registry-ui.example.com/{repository}")
    try:
        return check_homepage_template(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _source_files(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, pathlib.Path]:
    files: dict[str, pathlib.Path] = {}
    for item in value:
        name, sep, path = item.partition('=')
        if not sep or name not in SOURCE_NAMES or not path:
            raise click.BadParameter(f"expected NAME=PATH with NAME one of {', '.join(SOURCE_NAMES)}, got {item!r}")
        files[name] = pathlib.Path(path)
    return files


def common_options(function: F) -> F:
    decorators = [
        option('--host', default='0.0.0.0', show_default=True, help="Address the receiver listens on."),
        option('--port', type=click.IntRange(0, 65535), default=8080, show_default=True,
               help="Port of the receiver."),
        option('--token-file', type=click.Path(dir_okay=False, path_type=pathlib.Path),
               help="File holding the bearer token required on event endpoints."),
        option('--token', help="The bearer token itself (prefer --token-file: command lines are visible)."),
        option('--hmac-secret-file', type=click.Path(dir_okay=False, path_type=pathlib.Path),
               help="File holding a secret: requests signed with X-Signature: sha256=<HMAC of body> pass."),
        option('--read-timeout', type=Seconds(0.1, 600), default=10.0, show_default=True,
               help="Seconds a client has to send a whole request body."),
        option('--shutdown-grace', type=Seconds(0, 600), default=10.0, show_default=True,
               help="Seconds in-flight deliveries may finish after SIGTERM; the rest stay queued."),
        option('--state-dir', type=click.Path(file_okay=False, path_type=pathlib.Path), callback=_state_dir,
               default=pathlib.Path('.reponotify'), show_default=True, help="Folder for state files."),
        option('--retry-schedule', default='5s,5m,30m,2h', show_default=True, callback=_schedule,
               help="Delays before each retry of a failed delivery (full jitter applies)."),
        option('--workers', type=click.IntRange(1, 10_000), default=64, show_default=True,
               help="Concurrent delivery attempts."),
        option('--delivery-processes', type=ProcessCount(), default=AUTO, show_default=True,
               help="Child processes making delivery attempts (webhook, Slack, Flowdock, HipChat, e-mail), "
                    "so that sending uses more cores; 0 makes them in this process. auto: one per CPU this "
                    f"process may use (its CPU affinity and container CPU limit), at most {AUTO_LIMIT}, and "
                    "0 with one CPU. The outbox, retries and status stay in this process; the children run "
                    f"at a lower CPU priority (nice +{NICENESS}), so that receiving comes first when the cores "
                    "are busy."),
        option('--per-target', type=click.IntRange(1, 10_000), default=16, show_default=True,
               help="Concurrent attempts to one target host, so a slow target cannot take every worker."),
        option('--timeout', type=Seconds(0.1, 300), default=10.0, show_default=True,
               help="Seconds before a delivery attempt times out."),
        option('--status-interval', type=Seconds(0.0, 3600), default=1.0, show_default=True,
               help="At most one status write per notification per this many seconds."),
        option('--allow-targets', default='', callback=_policy,
               help="Comma-separated CIDRs and host names deliveries may reach although not globally routable "
                    "(in-cluster targets); everything else private, loopback or link-local is refused."),
        option('--flowdock-api-url', default=MethodSettings.flowdock_api_url, show_default=True,
               help="Flowdock team-inbox API base URL (self-hosted or compatible endpoints)."),
        option('--hipchat-api-url', default=MethodSettings.hipchat_api_url, show_default=True,
               help="HipChat v2 API base URL."),
        option('--smtp-host', help="SMTP server for the e-mail method."),
        option('--smtp-port', type=click.IntRange(1, 65535), default=25, show_default=True, help="SMTP port."),
        option('--smtp-security', type=click.Choice(['none', 'starttls', 'tls']), default='none',
               show_default=True, help="SMTP transport security."),
        option('--smtp-username', help="SMTP user name."),
        option('--smtp-password-file', type=click.Path(dir_okay=False, path_type=pathlib.Path),
               help="File holding the SMTP password."),
        option('--smtp-from', default=SmtpSettings.sender, show_default=True, help="Sender address of mails."),
        option('--smtp-ca-file', type=click.Path(dir_okay=False, exists=True),
               help="Extra CA bundle to trust for the SMTP server's certificate."),
        option('--public-url', callback=_public_url,
               help="The receiver's base URL as people reach it (e.g. https://reponotify.example.com): "
                    "e-mail verification links point there."),
        option('--email-hold-max-age', default='24h', show_default=True, callback=_duration,
               help="How long events for an e-mail address not verified yet wait for it; older ones are dropped."),
        option('--no-email-verification', is_flag=True, default=False,
               help="Mail addresses without verifying them first (trusted installations only)."),
        option('--distribution-registry-host', callback=_registry_host,
               help="Docker Distribution source: the registry host in docker_url (default: the host the pusher "
                    "used, from the registry's event)."),
        option('--distribution-homepage-url', callback=_homepage_template,
               help="Docker Distribution source: the homepage URL, a template with {repository}, {namespace}, "
                    "{name}, {host} (without placeholders the repository is appended); "
                    "default: <registry>/v2/<repository>/tags/list."),
        option('--harbor-homepage-url', callback=_homepage_template,
               help="Harbor source: the homepage URL template (as above); default: https://{host}/harbor/projects."),
        option('--source-token-file', 'source_token_files', multiple=True, callback=_source_files,
               metavar='NAME=PATH', help="A bearer token for one source instead of --token-file (repeatable; "
                                         f"NAME: {', '.join(SOURCE_NAMES)})."),
        option('--source-hmac-secret-file', 'source_hmac_secret_files', multiple=True, callback=_source_files,
               metavar='NAME=PATH', help="An HMAC secret for one source instead of --hmac-secret-file (repeatable)."),
        option('--unauthenticated-source', 'unauthenticated_sources', multiple=True,
               type=click.Choice(SOURCE_NAMES),
               help="A source that takes requests without credentials: only behind something that authenticates "
                    "them, such as an ingress checking a client certificate (repeatable)."),
        option('--log-level', type=click.Choice(['debug', 'info', 'warning', 'error']), default='info',
               show_default=True, help="Logging verbosity."),
        option('--log-format', type=click.Choice(LOG_FORMATS), default='text', show_default=True,
               help="Log lines as text, or as JSON objects (timestamp, level, logger, message, fields)."),
        option('--event-loop', type=click.Choice(EVENT_LOOPS), default=DEFAULT_EVENT_LOOP, show_default=True,
               help="The asyncio event loop: uvloop (faster per request), or asyncio's own. Delivery "
                    "processes run on the same."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _read_secret_file(path: pathlib.Path, option_name: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=option_name) from None
    if not value:
        raise click.BadParameter(f"{path} is empty", param_hint=option_name)
    return value


def build_settings(host: str, port: int, token_file: pathlib.Path | None, token: str | None,
                   hmac_secret_file: pathlib.Path | None, read_timeout: float, shutdown_grace: float,
                   state_dir: pathlib.Path, retry_schedule: tuple[float, ...], workers: int, per_target: int,
                   timeout: float,
                   status_interval: float, allow_targets: TargetPolicy, flowdock_api_url: str, hipchat_api_url: str, smtp_host: str | None,
                   smtp_port: int, smtp_security: str, smtp_username: str | None,
                   smtp_password_file: pathlib.Path | None, smtp_from: str, smtp_ca_file: str | None,
                   public_url: str | None = None, email_hold_max_age: float = DEFAULT_HOLD_MAX_AGE,
                   no_email_verification: bool = False,
                   distribution_registry_host: str | None = None, distribution_homepage_url: str | None = None,
                   harbor_homepage_url: str | None = None,
                   source_token_files: dict[str, pathlib.Path] | None = None,
                   source_hmac_secret_files: dict[str, pathlib.Path] | None = None,
                   unauthenticated_sources: tuple[str, ...] = (),
                   delivery_processes: int | str = 0,
                   **_: Any) -> Settings:
    if token_file is not None:
        token = _read_secret_file(token_file, '--token-file')
    smtp = SmtpSettings(
        host=smtp_host, port=smtp_port, security=smtp_security, username=smtp_username,
        password=_read_secret_file(smtp_password_file, '--smtp-password-file') if smtp_password_file else None,
        sender=smtp_from, ca_file=smtp_ca_file)
    methods = MethodSettings(flowdock_api_url=flowdock_api_url, hipchat_api_url=hipchat_api_url, smtp=smtp)
    return Settings(
        receiver=ReceiverSettings(
            host=host, port=port, token=token or None, read_timeout=read_timeout,
            hmac_secret=_read_secret_file(hmac_secret_file, '--hmac-secret-file') if hmac_secret_file else None,
            sources=SourceSettings(
                distribution_registry_host=distribution_registry_host,
                distribution_homepage_url=distribution_homepage_url, harbor_homepage_url=harbor_homepage_url,
                tokens={name: _read_secret_file(path, '--source-token-file')
                        for name, path in (source_token_files or {}).items()},
                hmac_secrets={name: _read_secret_file(path, '--source-hmac-secret-file')
                              for name, path in (source_hmac_secret_files or {}).items()},
                unauthenticated=frozenset(unauthenticated_sources))),
        engine=EngineSettings(
            dispatcher=DispatcherSettings(workers=workers, per_target=per_target, retry_schedule=retry_schedule,
                                          timeout=timeout, methods=methods, target_policy=allow_targets,
                                          delivery_processes=delivery_processes),
            status_interval=status_interval,
            verification=VerificationSettings(enabled=not no_email_verification, public_url=public_url,
                                              hold_max_age=email_hold_max_age)),
        state_dir=state_dir,
        shutdown_grace=shutdown_grace,
    )


def _configure_logging(level: str, log_format: str = 'text') -> None:
    configure_logging(level, log_format)


@click.group(context_settings={'help_option_names': ['-h', '--help'], 'max_content_width': 110})
@click.version_option(package_name='reponotify')
def main() -> None:
    """Quay-style repository notifications for any container registry."""


@main.command()
@common_options
@option('--namespace', 'namespaces', multiple=True,
        help="Watch only this namespace (repeatable); default: all namespaces.")
@option('--liveness', default='http://0.0.0.0:8081/healthz', show_default=True,
        help="kopf's liveness endpoint URL (empty to disable).")
@option('--kube-api-url', help="Use this API server URL without credentials (development and tests).")
@option('--repository-policy', type=click.Choice(['allow', 'deny']), default='allow', show_default=True,
        help="Tenancy: which repositories a namespace without the reponotify.dev/allowed-repositories "
             "annotation may subscribe to: all (allow) or none (deny).")
@option('--warning-event-interval', type=Seconds(0, 86400), default=60.0, show_default=True,
        help="At most one Warning Event about failed deliveries per notification per this many seconds "
             "(the next one counts those in between).")
def operator(namespaces: tuple[str, ...], liveness: str, kube_api_url: str | None, repository_policy: str,
             warning_event_interval: float, log_level: str, log_format: str, event_loop: str,
             **kwargs: Any) -> None:
    """Run the Kubernetes operator and the receiver."""
    from reponotify.kube.handlers import OperatorSettings, run_operator

    _configure_logging(log_level, log_format)
    settings = build_settings(**kwargs)
    options = OperatorSettings(common=settings, kube_api_url=kube_api_url, repository_policy=repository_policy,
                               warning_interval=warning_event_interval)
    run(run_operator(options, namespaces=list(namespaces), liveness_endpoint=liveness or None), event_loop)


@main.command()
@common_options
@option('--manifests', type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path), required=True,
        help="Folder of RepositoryNotification (and Secret) YAML files.")
def standalone(manifests: pathlib.Path, log_level: str, log_format: str, event_loop: str, **kwargs: Any) -> None:
    """Run the receiver and deliveries from a folder of YAML, without a cluster."""
    from reponotify.standalone import ManifestError, run_standalone

    _configure_logging(log_level, log_format)
    try:
        run(run_standalone(build_settings(**kwargs), manifests), event_loop)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
def crd() -> None:
    """Print the CustomResourceDefinition YAML."""
    from reponotify.crd import crd_yaml

    click.echo(crd_yaml(), nl=False)


@main.command()
@click.argument('event', type=click.Choice(EVENT_NAMES))
@option('--url', default='http://localhost:8080', show_default=True, help="The receiver's base URL.")
@option('--payload', type=click.File('rb'), help="JSON payload file ('-' for stdin); default: the sample.")
@option('--repository', help="With the sample payload: the repository to send it for.")
@option('--token-file', type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path),
        help="File holding the receiver's bearer token.")
@option('--idempotency-key', help="Idempotency-Key header: the same key is accepted once.")
def send(event: str, url: str, payload: Any, repository: str | None, token_file: pathlib.Path | None,
         idempotency_key: str | None) -> None:
    """Post one event to a receiver and print its answer."""
    import httpx

    body = payload.read() if payload is not None else json.dumps(sample_payload(event, repository)).encode()
    headers = {'Content-Type': 'application/json'}
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token.isascii():
            raise click.ClickException("--token-file holds characters that cannot go in a header (not ASCII)")
        headers['Authorization'] = f'Bearer {token}'
    if idempotency_key:
        if not (idempotency_key.isascii() and idempotency_key.isprintable()):
            raise click.ClickException("--idempotency-key must be printable ASCII")
        headers['Idempotency-Key'] = idempotency_key
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/events/{event}", content=body, headers=headers, timeout=30)
    except httpx.InvalidURL:
        raise click.ClickException(f"--url {url!r} is not a usable URL") from None
    except httpx.HTTPError as exc:
        raise click.ClickException(f"could not reach {url}: {exc}") from None
    click.echo(response.text)
    if response.status_code >= 400:
        sys.exit(1)


@main.command()
@option('--manifests', type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
        default=None, help="Folder of notifications to run the demo on (default: the embedded examples).")
def demo(manifests: pathlib.Path | None) -> None:
    """Run the end-to-end demo: standalone mode, a local target, the seven Quay sample events."""
    from reponotify.demo import run_demo

    _configure_logging('warning')
    sys.exit(run(run_demo(manifests)))

