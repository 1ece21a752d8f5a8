"""
Harbor webhooks (project > Webhooks, notify type ``http``), both payload formats.

``Default``: ``{"type": "PUSH_ARTIFACT", "occur_at", "operator", "event_data": {"resources": [...],
"repository": {"repo_full_name", "namespace", "name", ...}}}``. ``CloudEvents`` (Harbor 2.8+):
``{"specversion": "1.0", "id", "type": "harbor.artifact.pushed", "data": {...same event_data...}}``.

* ``PUSH_ARTIFACT`` / ``harbor.artifact.pushed``: a ``repo_push`` of ``repo_full_name`` with the
  resources' tags in ``updated_tags``. Harbor names the digest in ``tag`` when an artifact is
  pushed without a tag: such a push is ignored.
* ``SCANNING_COMPLETED`` / ``harbor.scan.completed``: one ``vulnerability_found`` per severity the
  scan summary counts (Critical, High, Medium, Low, Negligible, Unknown: Harbor and Quay use the same
  names), so each notification's ``eventConfig.level`` picks the severities it wants. Harbor sends
  counts, not single vulnerabilities, so the Quay fields are filled as well as the summary allows:
  ``priority`` the severity; ``id`` the scan report's id; ``description`` the count, the scanner and the
  totals; ``link`` Harbor's API URL listing the artifact's vulnerabilities; ``has_fix`` whether the
  report counts any fixable vulnerability (Harbor reports that for the whole report, not per severity).
* Any other type (pulls, deletes, quota, replication, ...): ignored, answered 202 with ``matched: 0``.

Idempotency: the CloudEvents ``id``, or for the Default format (which has none) a key derived
from type, time, repository and resources; Harbor re-sends the same body when it retries.
"""
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from reponotify.config import SourceSettings
from reponotify.events import PRIORITIES
from reponotify.sources.common import (Ignored, Malformed, Normalised, SourceEvent, clean_host, content_key, id_key,
                                       is_repository, is_tag, mapping, render_homepage, repository_fields,
                                       repository_problem)

KEY = 'harbor:'
PUSH = 'push'
SCAN = 'scan'
TYPES = {
    'PUSH_ARTIFACT': PUSH, 'harbor.artifact.pushed': PUSH,
    'SCANNING_COMPLETED': SCAN, 'harbor.scan.completed': SCAN,
}
DEFAULT_HOMEPAGE = 'https://{host}/harbor/projects'
_SEVERITIES = {name.lower(): name for name in PRIORITIES}


def normalise(body: Any, settings: SourceSettings) -> Normalised:
    if not isinstance(body, Mapping) or not isinstance(body.get('type'), str):
        raise Malformed('body is not a Harbor webhook payload: expected a JSON object with a "type"')
    kind = body['type']
    cloud_event = 'specversion' in body
    event_id = body.get('id') if cloud_event and isinstance(body.get('id'), str) and body.get('id') else None
    what = TYPES.get(kind)
    if what is None:
        return Normalised(ignored=[Ignored(f"Harbor event type {kind[:100]!r} has no Quay equivalent", event_id)])
    data = body.get('data' if cloud_event else 'event_data')
    if not isinstance(data, Mapping):
        raise Malformed(f"Harbor {kind} payload has no {'data' if cloud_event else 'event_data'} object")
    repository_info = mapping(data.get('repository'))
    repository = repository_info.get('repo_full_name')
    if not isinstance(repository, str):
        raise Malformed(f"Harbor {kind} payload has no repository.repo_full_name")
    resources = data.get('resources')
    if not isinstance(resources, list):
        raise Malformed(f"Harbor {kind} payload has no resources list")
    if not is_repository(repository):
        return Normalised(ignored=[Ignored(repository_problem(repository), event_id)])
    resources = [resource for resource in resources if isinstance(resource, Mapping)]
    base_key = (id_key(KEY, event_id) if event_id
                else content_key(KEY, kind, body.get('occur_at'), repository, resources))
    host = next(filter(None, (_host(resource.get('resource_url')) for resource in resources)), None)
    template = settings.harbor_homepage_url or DEFAULT_HOMEPAGE
    homepage = render_homepage(template, repository, host or '') if host or '{host}' not in template else ''
    fields = repository_fields(repository, host, homepage)
    if what == PUSH:
        return _push(fields, resources, base_key, event_id)
    project = repository_info.get('namespace') if isinstance(repository_info.get('namespace'), str) else None
    return _scan(fields, resources, base_key, event_id, host, project or repository.partition('/')[0])


def _host(resource_url: Any) -> str | None:
    # "harbor.example.com/acme/web:v1" or "harbor.example.com/acme/web@sha256:..."
    return clean_host(resource_url.split('/', 1)[0]) if isinstance(resource_url, str) else None


def _push(fields: dict[str, Any], resources: list[Mapping[str, Any]], key: str, event_id: str | None) -> Normalised:
    tags = list(dict.fromkeys(resource['tag'] for resource in resources if is_tag(resource.get('tag'))))
    if not tags:
        return Normalised(ignored=[Ignored("an artifact pushed without a tag (by digest)", event_id)])
    return Normalised(events=[SourceEvent('repo_push', {**fields, 'updated_tags': tags}, key)])


def _scan(fields: dict[str, Any], resources: list[Mapping[str, Any]], key: str, event_id: str | None,
          host: str | None, project: str) -> Normalised:
    events: list[SourceEvent] = []
    for index, resource in enumerate(resources):
        counts: dict[str, int] = {}
        total = fixable = 0
        report_id = scanner = ''
        for report in mapping(resource.get('scan_overview')).values():
            report = mapping(report)
            summary = mapping(report.get('summary'))
            for name, count in mapping(summary.get('summary')).items():
                severity = _SEVERITIES.get(str(name).lower())
                if severity is not None and _count(count) > 0:
                    counts[severity] = max(counts.get(severity, 0), _count(count))  # reports of one scan
            total = max(total, _count(summary.get('total')))
            fixable = max(fixable, _count(summary.get('fixable')))
            report_id = report_id or _text(report.get('report_id'))
            scanner = scanner or ' '.join(filter(None, (_text(mapping(report.get('scanner')).get('name')),
                                                        _text(mapping(report.get('scanner')).get('version')))))
        digest = _text(resource.get('digest'))
        tag = resource.get('tag') if is_tag(resource.get('tag')) else None
        reference = f"{fields['repository']}:{tag}" if tag else f"{fields['repository']}@{digest}"
        for severity in PRIORITIES:
            count = counts.get(severity, 0)
            if not count:
                continue
            noun = 'vulnerability' if count == 1 else 'vulnerabilities'
            by = f" by {scanner}" if scanner else ''
            vulnerability = {
                'id': report_id or digest,
                'description': f"{count} {severity} {noun} found{by} in {reference} "
                               f"({total} in total, {fixable} fixable)",
                'link': _report_link(host, project, fields['repository'], digest),
                'priority': severity,
                'has_fix': fixable > 0,
            }
            payload = {**fields, 'tags': [tag] if tag else [], 'vulnerability': vulnerability}
            events.append(SourceEvent('vulnerability_found', payload, f"{key}:{digest or index}:{severity}"))
    if not events:
        return Normalised(ignored=[Ignored("the scan reports no vulnerabilities", event_id)])
    return Normalised(events=events)


def _report_link(host: str | None, project: str, repository: str, digest: str) -> str:
    """Harbor's API URL of an artifact's vulnerability report (repository names are encoded twice)."""
    if not host or not digest:
        return ''
    name = repository.removeprefix(f"{project}/")
    return (f"https://{host}/api/v2.0/projects/{quote(project, safe='')}/repositories/"
            f"{quote(quote(name, safe=''), safe='')}/artifacts/{quote(digest, safe=':')}/additions/vulnerabilities")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ''

