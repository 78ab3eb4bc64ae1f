#!/usr/bin/env bash
# Install the WebSocket conformance runner: kosoku (PyPI), which runs the
# Autobahn|Testsuite case files under Python 3. Idempotent: does nothing when
# the pinned version is already in the venv.
#
#   tests/conformance/install.sh            # venv at ~/.cache/wskeep/kosoku-venv
#   KOSOKU_VENV=/some/dir tests/conformance/install.sh
#
# Prints the path of the kosoku executable as its last line.
set -euo pipefail

KOSOKU_VERSION=0.1.0
VENV=${KOSOKU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/wskeep/kosoku-venv}
PYTHON=${PYTHON:-python3}

installed_version() {
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kosoku"))' 2>/dev/null || true
}

if [[ -x "$VENV/bin/kosoku" && "$(installed_version)" == "$KOSOKU_VERSION" ]]; then
    echo "kosoku $KOSOKU_VERSION already installed in $VENV" >&2
    echo "$VENV/bin/kosoku"
    exit 0
fi

command -v "$PYTHON" >/dev/null || { echo "install.sh: $PYTHON not found (kosoku needs Python >= 3.10)" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "install.sh: kosoku needs Python >= 3.10, $PYTHON is $("$PYTHON" -V 2>&1)" >&2; exit 1; }

mkdir -p "$(dirname "$VENV")"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV" \
        || { echo "install.sh: '$PYTHON -m venv' failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION" >&2

[[ "$(installed_version)" == "$KOSOKU_VERSION" ]] \
    || { echo "install.sh: kosoku $KOSOKU_VERSION did not install into $VENV" >&2; exit 1; }
echo "installed kosoku $KOSOKU_VERSION in $VENV" >&2
echo "$VENV/bin/kosoku"
