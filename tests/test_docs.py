"""
The configuration reference (docs/configuration.md) is generated from the
command line's own options, so it cannot drift: this test regenerates it and
compares. To refresh it after changing an option: ``python tests/test_docs.py``.
"""
import pathlib
import sys

import click

from reponotify.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = ROOT / 'docs' / 'configuration.md'


def _default(option: click.Option) -> str:
    if option.is_flag:
        return 'off'
    default = option.default
    if default is None or callable(default) or type(default).__name__ == 'Sentinel' or default in ('', ()):
        return ''
    return f'`{default}`'


def render() -> str:
    lines = [
        '# Configuration reference',
        '',
        'Generated from the command line (`python tests/test_docs.py`); every option also reads its',
        'environment variable, which is how the Helm chart and containers configure reponotify.',
        '',
    ]
    for name in ('operator', 'standalone'):
        command = main.commands[name]
        lines += [f'## `reponotify {name}`', '', (command.help or '').strip(), '',
                  '| option | environment variable | default | meaning |', '|---|---|---|---|']
        for param in command.params:
            if isinstance(param, click.Option):
                meaning = ' '.join((param.help or '').split()).replace('|', '\\|')
                lines.append(f'| `{param.opts[0]}` | `{param.envvar}` | {_default(param)} | {meaning} |')
        lines.append('')
    return '\n'.join(lines)


def test_configuration_reference_is_up_to_date() -> None:
    assert REFERENCE.read_text() == render(), "docs/configuration.md is stale: run `python tests/test_docs.py`"


if __name__ == '__main__':
    REFERENCE.write_text(render())
    sys.exit(0)
