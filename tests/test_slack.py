"""
Slack: the exact message body (Quay's shape), colours per level, and the HTML-to-mrkdwn rules.
"""
import copy
import json
import re
from typing import Any

import pytest
from reponotify.events import new_event, sample_payload
from reponotify.methods.slack import html_to_mrkdwn, slack_body
from reponotify.notifications import InvalidSpec, NotificationKey, compile_notification
from reponotify.standalone import ManifestSecrets

REPO = 'https://quay.io/repository/dgangaia/test'
VULN_REPO = 'https://quay.io/repository/dgangaia/repository'


def body_for(kind: str, payload: dict[str, Any] | None = None, username: str = 'reponotify') -> dict[str, Any]:
    return slack_body(new_event(kind, payload or sample_payload(kind), event_id='e1'), username)


def attachment(fallback: str, text: str, color: str) -> dict[str, Any]:
    return {'fallback': fallback, 'text': text, 'color': color, 'mrkdwn_in': ['text']}


def test_build_failure_body_is_exact() -> None:
    summary = 'Build failure for repository dgangaia/test [5346a21]'
    assert body_for('build_failure') == {
        'text': summary,
        'username': 'reponotify',
        'attachments': [attachment(
            summary,
            f'<{REPO}/build/5346a21d-3434-4764-85be-5be1296f293c|Build 5346a21> failed for change '
            '<https://github.com/dgangaia/test/commit/6ae9a86930fc73dd07b02e4c5bf63ee60be180ad|6ae9a86> '
            'to branch *master* by <https://github.com/dgangaia|dgangaia> '
            f'in repository <{REPO}|dgangaia/test>\n'
            '_Could not find or parse Dockerfile: unknown instruction: GIT_',
            'danger')],
    }


def test_build_queued_body_is_exact() -> None:
    summary = 'Build queued for repository dgangaia/test [296ec06]'
    assert body_for('build_queued', username='quay') == {
        'text': summary,
        'username': 'quay',
        'attachments': [attachment(
            summary,
            f'<{REPO}/build/296ec063-5f86-4706-a469-f0a400bf9df2|Build 296ec06> queued for change '
            '<https://github.com/dgangaia/test/commit/b7f7d2b948aacbe844ee465122a85a9368b2b735|b7f7d2b> '
            'to branch *master* by <https://github.com/dgangaia|dgangaia> '
            f'in repository <{REPO}|dgangaia/test>',
            '#ffffff')],
    }


def test_repo_push_body_is_exact() -> None:
    # The documented sample's homepage points at dgangaia/repository although it is about dgangaia/test.
    summary = 'Repository dgangaia/test updated'
    assert body_for('repo_push') == {
        'text': summary,
        'username': 'reponotify',
        'attachments': [attachment(
            summary,
            f'Push of tags <{VULN_REPO}?tab=tags&tag=latest|latest> in repository <{VULN_REPO}|dgangaia/test>',
            'good')],
    }


def test_vulnerability_high_body_is_exact() -> None:
    payload = copy.deepcopy(sample_payload('vulnerability_found'))
    payload['vulnerability']['priority'] = 'High'
    summary = 'High vulnerability detected in repository dgangaia/repository in 2 tags'
    assert body_for('vulnerability_found', payload) == {
        'text': summary,
        'username': 'reponotify',
        'attachments': [attachment(
            summary,
            'A <http://url/to/vuln/info|High vulnerability> (CVE-1234-5678) was detected in tags '
            f'<{VULN_REPO}?tab=tags&tag=latest|latest>, <{VULN_REPO}?tab=tags&tag=othertag|othertag> '
            f'in repository <{VULN_REPO}|dgangaia/repository>\nA fix is available.',
            'warning')],
    }


def test_image_expiry_body_is_exact() -> None:
    summary = 'Repository dgangaia/test image(s) expiring'
    assert body_for('repo_image_expiry') == {
        'text': summary,
        'username': 'reponotify',
        'attachments': [attachment(
            summary,
            f'Tags <{REPO}?tab=tags&tag=latest|latest>, <{REPO}?tab=tags&tag=v1.2|v1.2> '
            f'in repository <{REPO}|dgangaia/test> expire in *7 days*',
            '#ffffff')],
    }


@pytest.mark.parametrize('kind, color', [
    ('repo_push', 'good'),  # primary
    ('build_queued', '#ffffff'),  # info
    ('build_start', '#ffffff'),
    ('build_success', 'good'),  # success
    ('build_failure', 'danger'),  # error
    ('build_cancelled', '#ffffff'),
    ('vulnerability_found', 'danger'),  # the sample is Critical: error
    ('repo_mirror_sync_started', '#ffffff'),
    ('repo_mirror_sync_success', 'good'),
    ('repo_mirror_sync_failed', 'danger'),
    ('repo_image_expiry', '#ffffff'),
])
def test_colour_per_event_level(kind: str, color: str) -> None:
    assert body_for(kind)['attachments'][0]['color'] == color


@pytest.mark.parametrize('priority, color', [
    ('Critical', 'danger'), ('High', 'warning'), ('Medium', 'warning'), ('Low', '#ffffff'),
    ('Negligible', '#ffffff'), ('Unknown', '#ffffff'),
])
def test_vulnerability_colour_follows_priority(priority: str, color: str) -> None:
    payload = copy.deepcopy(sample_payload('vulnerability_found'))
    payload['vulnerability']['priority'] = priority
    body = body_for('vulnerability_found', payload)
    assert body['attachments'][0]['color'] == color
    assert body['text'] == f'{priority} vulnerability detected in repository dgangaia/repository in 2 tags'


def test_user_content_cannot_inject_a_mention_or_a_link_through_the_summary() -> None:
    """The top-level text (and the fallback) is the summary, which quotes payload fields: escaped as well."""
    payload = sample_payload('repo_mirror_sync_failed') | {'message': '<!channel> <https://evil.example|Click> & x'}
    body = body_for('repo_mirror_sync_failed', payload)
    escaped = 'Repository Mirror failed for &lt;!channel&gt; &lt;https://evil.example|Click&gt; &amp; x'
    assert body['text'] == escaped
    assert body['attachments'][0]['fallback'] == escaped


def test_user_content_cannot_add_a_link_through_a_url_field() -> None:
    """A URL with "|" or ">" made a second, attacker-chosen link; they are percent-encoded in the link now."""
    payload = sample_payload('repo_push') | {
        'homepage': 'https://quay.io/repository/acme/web|Fake> <https://evil.example/phish|Click here'}
    text = body_for('repo_push', payload)['attachments'][0]['text']
    links = re.findall(r'<([^|>]*)\|([^>]*)>', text)
    assert text.count('<') == text.count('>') == len(links) == 2  # the message's own two links, and no other
    assert all(url.startswith('https://quay.io/repository/acme/web%7CFake%3E %3Chttps://evil.example/phish%7CClick')
               for url, _ in links), links


def test_user_content_cannot_inject_slack_markup() -> None:
    payload = sample_payload('build_failure') | {'error_message': 'a < b & <https://evil.example|click> *x*'}
    text = body_for('build_failure', payload)['attachments'][0]['text']
    assert text.endswith('\n_a &lt; b &amp; &lt;https://evil.example|click&gt; *x*_')


# -- html_to_mrkdwn ---------------------------------------------------------------------------------

@pytest.mark.parametrize('html, mrkdwn', [
    ('a\nb', 'a b'),  # newline -> space
    ('a  \t\n\n  b', 'a b'),  # whitespace collapses
    ('  padded  ', 'padded'),
    ('one<br>two', 'one\ntwo'),  # <br> -> line break
    ('one <br/> two', 'one\ntwo'),
    ('one\n<br />\ntwo', 'one\ntwo'),
    ('one<BR>two', 'one\ntwo'),
    ('A<br><br>B', 'A\n\nB'),
    ('<a href="https://x.example/y?a=1&amp;b=2">the\n text</a>', '<https://x.example/y?a=1&b=2|the text>'),
    ('see <a href="https://x.example">here</a>.', 'see <https://x.example|here>.'),
    ('branch\n<b>main</b>\nby', 'branch *main* by'),  # word boundaries kept (Quay lost them)
    ('<strong>strong</strong> text', '*strong* text'),
    ('<i>italic</i> and <em>em</em>', '_italic_ and _em_'),
    ('<div>a</div> <span>b</span><p>c</p>', 'a bc'),  # other tags dropped
    ('<table><tr><td>cell</td></tr></table>', 'cell'),
    ('&amp; &lt;tag&gt;', '&amp; &lt;tag&gt;'),  # entities decoded, then escaped for Slack
    ('a < b > c & d', 'a &lt; b &gt; c &amp; d'),
    ('<a href="u">a > b & c</a>', '<u|a &gt; b &amp; c>'),
    ('', ''),
])
def test_html_to_mrkdwn(html: str, mrkdwn: str) -> None:
    assert html_to_mrkdwn(html) == mrkdwn


# -- end to end -------------------------------------------------------------------------------------

async def test_slack_delivery_posts_the_exact_body(http_target, tmp_path) -> None:
    from reponotify.dispatcher import DispatcherSettings
    from reponotify.engine import Engine, EngineSettings
    from reponotify.standalone import StatusFile

    key = NotificationKey('demo', 'failures-to-slack')
    url = f'{http_target.url}/services/T000/B000/XXXX'
    secrets = ManifestSecrets({('demo', 'slack'): {'url': url}})
    spec = {'repository': 'dgangaia/test', 'event': 'build_failure', 'method': 'slack',
            'config': {'urlFrom': {'secretKeyRef': {'name': 'slack', 'key': 'url'}}, 'username': 'Quay'}}
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=1, retry_schedule=())))
    engine.put_notification(await compile_notification(key, spec, secrets))
    await engine.start(StatusFile(tmp_path / 'status.json'))
    try:
        accepted = await engine.ingest('build_failure', sample_payload('build_failure'))
        [received] = await http_target.wait_for(1, '/services/T000/B000/XXXX')
    finally:
        await engine.stop()
    assert accepted.matched == 1
    expected = body_for('build_failure', username='Quay')
    assert received.method == 'POST'
    assert received.headers['Content-Type'] == 'application/json'
    assert received.body == json.dumps(expected).encode()
    assert received.json()['attachments'][0]['color'] == 'danger'


@pytest.mark.parametrize('url, message', [
    ('ftp://hooks.slack.example/services/T0/B0/SECRETTOKEN', "spec.config.url: must be an http:// or https:// URL"),
    ('https:///services/T0/B0/SECRETTOKEN', "spec.config.url: must be a URL with a host name"),
    ('hooks.slack.example/services/T0/B0/SECRETTOKEN', "spec.config.url: must be an http:// or https:// URL"),
])
async def test_invalid_slack_url_is_rejected_without_showing_it(url: str, message: str) -> None:
    for config in ({'url': url}, {'urlFrom': {'secretKeyRef': {'name': 'slack', 'key': 'url'}}}):
        spec = {'repository': 'dgangaia/test', 'event': 'build_failure', 'method': 'slack', 'config': config}
        with pytest.raises(InvalidSpec) as caught:
            await compile_notification(NotificationKey('ns', 'n'), spec,
                                       ManifestSecrets({('ns', 'slack'): {'url': url}}))
        assert str(caught.value) == message
        assert 'SECRETTOKEN' not in str(caught.value)
