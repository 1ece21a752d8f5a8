# Sourced by the other scripts: a virtualenv in .venv with reponotify and its test tools installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e '.[test]'
    touch .venv/.installed
fi
