"""
Webhook body templates: ``${<JSONPath>}`` in every string of a JSON document (QUAY-SEMANTICS.md).

Rendering is checked on exact values; errors on exact messages, both from
:func:`compile_template` and as a notification's ``InvalidSpec``. The end-to-end
tests check the exact bytes a real webhook target receives.
"""
import json
from typing import Any

import pytest
from reponotify.bodytemplate import TemplateError, compile_template
from reponotify.events import sample_payload
from reponotify.notifications import InvalidSpec, NotificationKey, compile_notification
from reponotify.standalone import ManifestSecrets

PUSH = sample_payload('repo_push')  # updated_tags: ["latest"]
VULNERABILITY = sample_payload('vulnerability_found')  # tags: ["latest", "othertag"]
NUMBERS = {'repository': 'acme/web', 'count': 3, 'ratio': 0.5, 'flag': False, 'nothing': None,
           'nested': {'list': [1, 2], 'name': 'x'}, 'empty': []}


def render(template: Any, payload: Any) -> Any:
    return compile_template(json.dumps(template)).render(payload)


# -- a string that is exactly one expression keeps the value's type ------------------------------

@pytest.mark.parametrize('expression, expected', [
    ('repository', 'acme/web'),
    ('count', 3),
    ('ratio', 0.5),
    ('flag', False),
    ('nothing', None),  # present but null
    ('nested', {'list': [1, 2], 'name': 'x'}),
    ('nested.list', [1, 2]),
    ('nested.list[1]', 2),
    ('nested.name', 'x'),
    ('$.count', 3),
    ('empty', []),
])
def test_exact_expression_keeps_the_type(expression: str, expected: Any) -> None:
    assert render({'v': f'${{{expression}}}'}, NUMBERS) == {'v': expected}


def test_exact_expression_of_a_list_field_is_the_list() -> None:
    assert render({'tags': '${updated_tags}'}, PUSH) == {'tags': ['latest']}
    assert render({'tags': '${tags}'}, VULNERABILITY) == {'tags': ['latest', 'othertag']}


@pytest.mark.parametrize('expression', ['missing', 'nested.missing', 'nested.list[5]', 'repository.deeper'])
def test_exact_expression_that_matches_nothing_is_null(expression: str) -> None:
    assert render({'v': f'${{{expression}}}'}, NUMBERS) == {'v': None}


def test_several_matches_exact_are_a_list() -> None:
    # Quay crashed on ${tags[*]}; here it is the list of matches.
    assert render({'tags': '${tags[*]}'}, VULNERABILITY) == {'tags': ['latest', 'othertag']}
    assert render({'ids': '${nested.list[*]}'}, NUMBERS) == {'ids': [1, 2]}


# -- an expression inside a longer string is rendered as text ------------------------------------

@pytest.mark.parametrize('text, expected', [
    ('repo ${repository}', 'repo acme/web'),
    ('${count} items', '3 items'),
    ('ratio=${ratio}', 'ratio=0.5'),
    ('flag=${flag}', 'flag=false'),
    ('none=${nothing}', 'none=(none)'),  # null renders like missing
    ('missing=${missing}', 'missing=(none)'),
    ('list=${nested.list}', 'list=1,2'),
    ('all=${nested.list[*]}', 'all=1,2'),
    ('${repository}${count}', 'acme/web3'),
    ('${repository} and ${repository}', 'acme/web and acme/web'),
    ('no expressions at all', 'no expressions at all'),
    ('', ''),
    ('$repository {repository}', '$repository {repository}'),  # not expressions
])
def test_inline_expression_renders_text(text: str, expected: str) -> None:
    assert render({'v': text}, NUMBERS) == {'v': expected}


def test_several_matches_inline_are_comma_joined() -> None:
    assert render({'text': 'tags: ${tags[*]}'}, VULNERABILITY) == {'text': 'tags: latest,othertag'}
    assert render({'text': 'tags: ${tags}'}, VULNERABILITY) == {'text': 'tags: latest,othertag'}


def test_inline_object_renders_as_json_text() -> None:
    assert render({'v': 'n=${nested}'}, NUMBERS) == {'v': 'n={"list": [1, 2], "name": "x"}'}


# -- structure -----------------------------------------------------------------------------------

def test_keys_are_templated() -> None:
    template = {'${name}': '${repository}', 'fixed': 1, 'k-${count}': 'v', '${count}': 'exact number key',
                '${missing}': 'missing key'}
    assert render(template, {**NUMBERS, 'name': 'web'}) == {
        'web': 'acme/web', 'fixed': 1, 'k-3': 'v', '3': 'exact number key', '(none)': 'missing key'}


def test_nested_documents_lists_and_non_strings_are_walked() -> None:
    template = {'outer': {'inner': ['${count}', 'x ${count}', 7, None, True, {'deep': '${nested.name}'}]}}
    assert render(template, NUMBERS) == {'outer': {'inner': [3, 'x 3', 7, None, True, {'deep': 'x'}]}}


def test_template_may_be_any_json_value() -> None:
    assert compile_template('"${repository}"').render(NUMBERS) == 'acme/web'
    assert compile_template('["${count}", 1]').render(NUMBERS) == [3, 1]
    assert compile_template('42').render(NUMBERS) == 42


def test_repository_names_with_slashes_are_fine() -> None:
    # Quay's templates broke on "namespace/name"; deeper registry paths must work too.
    payload = sample_payload('repo_push', 'group/sub/web')
    assert render({'r': '${repository}', 'u': 'see ${homepage}', 'd': '${docker_url}'}, payload) == {
        'r': 'group/sub/web', 'u': 'see https://quay.io/repository/group/sub/web',
        'd': 'quay.io/group/sub/web'}


def test_documented_fields_of_a_build_event() -> None:
    payload = sample_payload('build_success')
    template = {'by': '${trigger_metadata.commit_info.author.username}', 'tag': '${docker_tags[0]}',
                'tags': '${docker_tags}', 'digests': '${manifest_digests[*]}', 'msg': 'built ${build_name}'}
    assert render(template, payload) == {
        'by': 'dgangaia', 'tag': 'master', 'tags': ['master', 'latest'],
        'digests': payload['manifest_digests'], 'msg': 'built b7f7d2b'}


def test_rendering_does_not_change_the_template_or_the_payload() -> None:
    template = compile_template('{"a": "${nested.list}", "b": ["${count}"], "${nested.name}": "k"}')
    payload = json.loads(json.dumps(NUMBERS))
    assert template.render(payload) == {'a': [1, 2], 'b': [3], 'x': 'k'}
    assert template.render(payload) == {'a': [1, 2], 'b': [3], 'x': 'k'}
    assert payload == NUMBERS
    assert template.document == {'a': '${nested.list}', 'b': ['${count}'], '${nested.name}': 'k'}


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize('text, message', [
    ('{"a": "${}"}', "template has an empty expression ${}"),
    ('{"a": "x ${  } y"}', "template has an empty expression ${}"),
    ('{"${}": 1}', "template has an empty expression ${}"),
    ('{"a": "${repository[}"}',
     "template expression ${repository[} is not valid JSONPath: Parse error near the end of string!"),
    ('{"a": "${$$}"}', "template expression ${$$} is not valid JSONPath: Parse error at 1:1 near token $ ($)"),
    ('{"a": "${a..}"}', "template expression ${a..} is not valid JSONPath: Parse error near the end of string!"),
    ('not json', "template is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    ('{"a": "${repository}"', "template is not valid JSON: Expecting ',' delimiter: line 1 column 22 (char 21)"),
    ("{'a': 1}",
     "template is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
])
def test_bad_templates_are_rejected_with_exact_messages(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        compile_template(text)
    assert str(caught.value) == message


async def test_bad_template_makes_the_notification_invalid() -> None:
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'url': 'http://127.0.0.1:9/hook', 'template': '{"a": "${}"}'}}
    with pytest.raises(InvalidSpec) as caught:
        await compile_notification(NotificationKey('ns', 'n'), spec, ManifestSecrets({}))
    assert str(caught.value) == "spec.config.template: template has an empty expression ${}"

    spec['config']['template'] = '{"a": "${repository[}"}'
    with pytest.raises(InvalidSpec) as caught:
        await compile_notification(NotificationKey('ns', 'n'), spec, ManifestSecrets({}))
    assert str(caught.value) == ("spec.config.template: template expression ${repository[} is not valid "
                                 "JSONPath: Parse error near the end of string!")


# -- end to end: what the webhook target receives ---------------------------------------------------

async def test_webhook_with_a_template_delivers_exactly_the_rendered_json(http_target, tmp_path) -> None:
    from reponotify.dispatcher import DispatcherSettings
    from reponotify.engine import Engine, EngineSettings
    from reponotify.standalone import StatusFile

    template = ('{"repo": "${repository}", "tags": "${updated_tags}", "first": "${updated_tags[0]}", '
                '"text": "pushed ${updated_tags[*]} to ${docker_url}", "missing": "${nope}", '
                '"inline_missing": "x ${nope}", "${namespace}": {"n": 1}}')
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'url': f'{http_target.url}/hooks/ci', 'template': template}}
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=1, retry_schedule=())))
    key = NotificationKey('ns', 'push-to-ci')
    engine.put_notification(await compile_notification(key, spec, ManifestSecrets({})))
    await engine.start(StatusFile(tmp_path / 'status.json'))
    try:
        payload = sample_payload('repo_push', 'acme/web') | {'updated_tags': ['latest', 'v1.0']}
        accepted = await engine.ingest('repo_push', payload)
        assert accepted.matched == 1
        [received] = await http_target.wait_for(1, '/hooks/ci')
    finally:
        await engine.stop()
    expected = {'repo': 'acme/web', 'tags': ['latest', 'v1.0'], 'first': 'latest',
                'text': 'pushed latest,v1.0 to quay.io/acme/web', 'missing': None,
                'inline_missing': 'x (none)', 'acme': {'n': 1}}
    assert received.body == json.dumps(expected).encode()
    assert received.method == 'POST'
    assert received.headers['Content-Type'] == 'application/json'
