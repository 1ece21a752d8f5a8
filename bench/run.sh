#!/usr/bin/env bash
# The benchmark: every scenario on this machine (see bench/README.md). Options: bench/run.py --help.
. "$(dirname "$0")/../scripts/env.sh"
exec python bench/run.py "$@"
