#!/usr/bin/env bash
# The main job: standalone mode on examples/, the seven Quay sample events, a table of outcomes.
. "$(dirname "$0")/env.sh"
exec reponotify demo "$@"
