#!/usr/bin/env bash
# Installs Python `websockets` (PyPI, pinned) in a venv for tests/networks.rs, whose upstreams on a
# Unix socket and over TLS are real Python websockets servers. Idempotent.
#   venv: ~/.cache/wskeep/websockets-venv (the tests look there first, then at python3)
set -euo pipefail
VERSION=15.0.1
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/wskeep/websockets-venv
if "$VENV/bin/python" -c "import websockets, sys; sys.exit(websockets.__version__ != '$VERSION')" 2>/dev/null; then
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "websockets==$VERSION"
"$VENV/bin/python" -c "import websockets; print('websockets', websockets.__version__, 'in $VENV')"
