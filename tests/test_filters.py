"""
Per-event filters (``eventConfig``) with Quay's exact semantics (QUAY-SEMANTICS.md),
and the errors a person gets when a filter cannot be used.
"""
import copy
from typing import Any

import pytest
from reponotify.events import Event, new_event, sample_payload
from reponotify.notifications import (
    InvalidSpec,
    NotificationKey,
    compile_filter,
    compile_notification,
    parse_spec,
)
from reponotify.routing import RoutingTable
from reponotify.standalone import ManifestSecrets

BUILD_EVENTS = ['build_queued', 'build_start', 'build_success', 'build_failure', 'build_cancelled']
KEY = NotificationKey('ns', 'n')


def spec(event: str, event_config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {'repository': 'dgangaia/test', 'event': event, 'method': 'webhook',
                           'config': {'url': 'http://127.0.0.1:9/hook'}, **extra}
    if event_config is not None:
        raw['eventConfig'] = event_config
    return raw


def fires(event: str, event_config: dict[str, Any] | None, payload: dict[str, Any]) -> bool:
    return compile_filter(parse_spec(spec(event, event_config)))(payload)


def build_payload(kind: str, ref: Any = ..., *, metadata: Any = ...) -> dict[str, Any]:
    payload = copy.deepcopy(sample_payload(kind))
    if metadata is not ...:
        if metadata is None:
            del payload['trigger_metadata']
        else:
            payload['trigger_metadata'] = metadata
    if ref is not ...:
        if ref is None:
            del payload['trigger_metadata']['ref']
        else:
            payload['trigger_metadata']['ref'] = ref
    return payload


def vulnerability(priority: Any = ..., **overrides: Any) -> dict[str, Any]:
    payload = copy.deepcopy(sample_payload('vulnerability_found'))
    if priority is ...:
        del payload['vulnerability']['priority']
    else:
        payload['vulnerability']['priority'] = priority
    payload.update(overrides)
    return payload


# -- refRegex (build events) -----------------------------------------------------------------------

def test_the_samples_ref_is_refs_heads_master() -> None:
    for kind in BUILD_EVENTS:
        assert sample_payload(kind)['trigger_metadata']['ref'] == 'refs/heads/master'


@pytest.mark.parametrize('kind', BUILD_EVENTS)
@pytest.mark.parametrize('regex, expected', [
    ('refs/heads/master', True),
    ('refs/heads/ma', True),  # re.match: anchored at the start only, a prefix is enough
    ('refs/heads/.*', True),
    ('refs/(heads|tags)/', True),
    ('heads/master', False),  # not anchored at the end, but anchored at the start
    ('.*heads/master', True),
    ('refs/heads/master$', True),
    ('refs/heads/main', False),
    ('refs/tags/', False),
    ('REFS/HEADS/MASTER', False),  # case-sensitive
])
def test_ref_regex_is_re_match(kind: str, regex: str, expected: bool) -> None:
    assert fires(kind, {'refRegex': regex}, sample_payload(kind)) is expected


@pytest.mark.parametrize('event_config', [None, {}, {'refRegex': ''}, {'refRegex': None}])
def test_empty_or_missing_ref_regex_always_fires(event_config: dict[str, Any] | None) -> None:
    assert fires('build_success', event_config, sample_payload('build_success'))
    # even a manual build with no trigger metadata at all
    assert fires('build_success', event_config, build_payload('build_success', metadata=None))


@pytest.mark.parametrize('payload', [
    build_payload('build_queued', metadata=None),  # a manual build: no trigger_metadata
    build_payload('build_queued', ref=None),  # trigger metadata without a ref
    build_payload('build_queued', metadata={}),
    build_payload('build_queued', metadata=None) | {'trigger_metadata': None},
    build_payload('build_queued', ref=7),  # not a string
])
def test_no_ref_never_fires_when_a_regex_is_set(payload: dict[str, Any]) -> None:
    assert not fires('build_queued', {'refRegex': '.*'}, payload)
    assert not fires('build_queued', {'refRegex': 'refs/'}, payload)


def test_ref_regex_against_another_ref() -> None:
    tag = build_payload('build_start', 'refs/tags/v1.2.0')
    assert fires('build_start', {'refRegex': 'refs/tags/v1\\.'}, tag)
    assert not fires('build_start', {'refRegex': 'refs/heads/'}, tag)


@pytest.mark.parametrize('regex, detail', [
    ('(', "missing ), unterminated subpattern at position 0"),
    ('refs/heads/[main', "unterminated character set at position 11"),
    ('*', "nothing to repeat at position 0"),
])
async def test_invalid_ref_regex_is_rejected_at_compile(regex: str, detail: str) -> None:
    message = f"spec.eventConfig.refRegex is not a valid regular expression: {detail}"
    with pytest.raises(InvalidSpec) as caught:
        compile_filter(parse_spec(spec('build_start', {'refRegex': regex})))
    assert str(caught.value) == message
    with pytest.raises(InvalidSpec) as caught:
        await compile_notification(KEY, spec('build_start', {'refRegex': regex}), ManifestSecrets({}))
    assert str(caught.value) == message
    assert caught.value.reason == 'InvalidSpec'


# -- level (vulnerability_found) -------------------------------------------------------------------

PRIORITY_NAMES = ['Critical', 'High', 'Medium', 'Low', 'Negligible', 'Unknown']


@pytest.mark.parametrize('level', ['High', '1', 1])
def test_level_high_fires_for_critical_and_high_only(level: Any) -> None:
    results = {priority: fires('vulnerability_found', {'level': level}, vulnerability(priority))
               for priority in PRIORITY_NAMES}
    assert results == {'Critical': True, 'High': True, 'Medium': False, 'Low': False, 'Negligible': False,
                       'Unknown': False}


@pytest.mark.parametrize('index, name', list(enumerate(PRIORITY_NAMES)))
def test_level_by_name_index_string_and_int_agree(index: int, name: str) -> None:
    for priority_index, priority in enumerate(PRIORITY_NAMES):
        expected = priority_index <= index
        for level in (name, str(index), index):
            assert fires('vulnerability_found', {'level': level}, vulnerability(priority)) is expected, \
                (level, priority)


@pytest.mark.parametrize('priority', ['Severe', 'critical', '', None, 0])
def test_unknown_priority_never_fires(priority: Any) -> None:
    for level in PRIORITY_NAMES:
        assert not fires('vulnerability_found', {'level': level}, vulnerability(priority))


def test_missing_priority_counts_as_unknown_as_in_quay() -> None:
    assert fires('vulnerability_found', {'level': 'Unknown'}, vulnerability())
    assert not fires('vulnerability_found', {'level': 'Negligible'}, vulnerability())


def test_missing_vulnerability_never_fires_when_a_level_is_set() -> None:
    payload = sample_payload('vulnerability_found')
    del payload['vulnerability']
    assert not fires('vulnerability_found', {'level': 'Unknown'}, payload)


@pytest.mark.parametrize('event_config', [None, {}, {'level': None}])
def test_missing_level_always_fires(event_config: dict[str, Any] | None) -> None:
    for priority in [*PRIORITY_NAMES, 'Severe']:
        assert fires('vulnerability_found', event_config, vulnerability(priority))


@pytest.mark.parametrize('level, shown', [('Severe', "'Severe'"), ('high', "'high'"), ('6', "'6'"), (6, '6'),
                                          (-1, '-1')])
async def test_unknown_level_is_rejected(level: Any, shown: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        await compile_notification(KEY, spec('vulnerability_found', {'level': level}), ManifestSecrets({}))
    assert str(caught.value) == (
        "spec.eventConfig.level: level must be one of Critical, High, Medium, Low, Negligible, Unknown "
        f"or an index 0..5, not {shown}")


@pytest.mark.parametrize('level', [True, False, 1.0, [1]])
def test_level_of_another_type_is_rejected(level: Any) -> None:
    # YAML `level: true` must not silently mean index 1 (High); the CRD schema refuses it too.
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec('vulnerability_found', {'level': level}))
    assert str(caught.value) == ("spec.eventConfig.level.int: Input should be a valid integer; "
                                 "spec.eventConfig.level.str: Input should be a valid string")


# -- days (repo_image_expiry) ----------------------------------------------------------------------

def expiry(expiring_in: Any) -> dict[str, Any]:
    return sample_payload('repo_image_expiry') | {'expiring_in': expiring_in}


def test_the_expiry_sample_expires_in_7_days() -> None:
    assert sample_payload('repo_image_expiry')['expiring_in'] == '7 days'


@pytest.mark.parametrize('days, expiring_in, expected', [
    (7, '7 days', True),
    (8, '7 days', True),
    (6, '7 days', False),
    (1, '1 day', True),
    (1, '2 days', False),
    (30, '0 days', True),
])
def test_days_filter(days: int, expiring_in: str, expected: bool) -> None:
    assert fires('repo_image_expiry', {'days': days}, expiry(expiring_in)) is expected


@pytest.mark.parametrize('days, expiring_in', [(1, '1 days'), (3, '3 days'), (30, '30 days')])
async def test_a_test_of_an_expiry_notification_expires_within_its_days(days: int, expiring_in: str) -> None:
    """As Quay builds its test sample from the configured days: with days under 7, the test was always Filtered."""
    from reponotify.engine import test_payload
    from reponotify.notifications import NotificationKey, compile_notification

    spec = {'repository': 'acme/web', 'event': 'repo_image_expiry', 'eventConfig': {'days': days},
            'method': 'webhook', 'config': {'url': 'https://ci.example.com/hook'}}
    notification = await compile_notification(NotificationKey('team-a', 'expiry'), spec, ManifestSecrets({}))
    payload = test_payload(notification)
    assert payload['expiring_in'] == expiring_in
    assert notification.matches(payload)


def test_days_filter_without_a_usable_expiry_does_not_fire() -> None:
    payload = sample_payload('repo_image_expiry')
    del payload['expiring_in']
    assert not fires('repo_image_expiry', {'days': 3650}, payload)
    assert not fires('repo_image_expiry', {'days': 3650}, expiry('soon'))


@pytest.mark.parametrize('event_config', [None, {}, {'days': None}])
async def test_days_is_required_for_image_expiry(event_config: dict[str, Any] | None) -> None:
    with pytest.raises(InvalidSpec) as caught:
        await compile_notification(KEY, spec('repo_image_expiry', event_config), ManifestSecrets({}))
    assert str(caught.value) == "spec.eventConfig.days is required for repo_image_expiry"


@pytest.mark.parametrize('days, message', [
    (0, "spec.eventConfig.days: Input should be greater than or equal to 1"),
    (3651, "spec.eventConfig.days: Input should be less than or equal to 3650"),
])
def test_days_out_of_range_is_rejected(days: int, message: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec('repo_image_expiry', {'days': days}))
    assert str(caught.value) == message


# -- a filter on the wrong event -------------------------------------------------------------------

@pytest.mark.parametrize('event, event_config, message', [
    ('repo_push', {'refRegex': 'refs/heads/'},
     "spec.eventConfig.refRegex does not apply to repo_push (it takes no eventConfig)"),
    ('repo_mirror_sync_failed', {'days': 3},
     "spec.eventConfig.days does not apply to repo_mirror_sync_failed (it takes no eventConfig)"),
    ('vulnerability_found', {'refRegex': 'refs/heads/'},
     "spec.eventConfig.refRegex does not apply to vulnerability_found (it takes the level filter)"),
    ('build_success', {'level': 'High'},
     "spec.eventConfig.level does not apply to build_success (it takes the refRegex filter)"),
    ('repo_image_expiry', {'days': 3, 'level': 'High'},
     "spec.eventConfig.level does not apply to repo_image_expiry (it takes the days filter)"),
    ('build_queued', {'refRegex': 'x', 'days': 3},
     "spec.eventConfig.days does not apply to build_queued (it takes the refRegex filter)"),
])
async def test_filter_on_the_wrong_event_is_rejected(event: str, event_config: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        await compile_notification(KEY, spec(event, event_config), ManifestSecrets({}))
    assert str(caught.value) == message


def test_unknown_event_config_field_is_rejected() -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec('build_queued', {'ref-regex': 'refs/heads/'}))
    assert str(caught.value) == "spec.eventConfig.ref-regex: Extra inputs are not permitted"


# -- through the routing table ---------------------------------------------------------------------

async def test_routing_applies_filters_per_notification() -> None:
    table = RoutingTable()
    secrets = ManifestSecrets({})
    for name, event_config in [('master', {'refRegex': 'refs/heads/master'}), ('release', {'refRegex': 'refs/heads/release-'}),
                               ('all', None)]:
        table.put(await compile_notification(NotificationKey('ns', name), spec('build_success', event_config), secrets))

    def matched(payload: dict[str, Any]) -> list[str]:
        event: Event = new_event('build_success', payload)
        return sorted(n.key.name for n in table.match(event))

    assert matched(sample_payload('build_success')) == ['all', 'master']
    assert matched(build_payload('build_success', 'refs/heads/release-1.0')) == ['all', 'release']
    assert matched(build_payload('build_success', metadata=None)) == ['all']
    assert matched(sample_payload('build_success', 'other/repo')) == []
