"""The per-event HTML messages: payload values are escaped, and only http(s) links survive."""
from reponotify.events import new_event, sample_payload
from reponotify.messages import render_html


def test_payload_markup_is_escaped_in_messages() -> None:
    payload = sample_payload('build_failure', 'acme/web')
    payload['error_message'] = '<script>alert(1)</script>'
    html = render_html(new_event('build_failure', payload))
    assert '<i>&lt;script&gt;alert(1)&lt;/script&gt;</i>' in html
    assert '<script>' not in html


def test_links_with_other_schemes_than_http_are_neutralised() -> None:
    payload = sample_payload('vulnerability_found', 'acme/web')
    payload['vulnerability'] = {**payload['vulnerability'], 'link': 'javascript:alert(1)'}
    payload['homepage'] = 'JavaScript:alert(2)'
    html = render_html(new_event('vulnerability_found', payload))
    assert 'javascript' not in html.lower()
    assert html.startswith('A <a href="#">Critical vulnerability</a> (CVE-1234-5678) was detected in tags '
                           '<a href="#?tab=tags&amp;tag=latest">latest</a>')


def test_http_links_are_kept() -> None:
    html = render_html(new_event('vulnerability_found', sample_payload('vulnerability_found', 'acme/web')))
    assert '<a href="http://url/to/vuln/info">Critical vulnerability</a>' in html
    assert '<a href="https://quay.io/repository/acme/web">acme/web</a>' in html
