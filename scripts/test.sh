#!/usr/bin/env bash
# The test suite (what CI runs).
. "$(dirname "$0")/env.sh"
exec python -m pytest "$@"
