# Shared by scripts/demo and scripts/test: make (or reuse) the Python environment.
# Sourced, not run. Sets VENV and PY. The environment lives outside the checkout, keyed by
# pyproject.toml, so a later run on the same machine reuses it; a fresh machine builds it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SPANTRAIN_CACHE:-$HOME/.cache/spantrain}
PYTHON_BIN=${PYTHON:-python3}
# keyed by what pip installs (build system, dependencies, extras), not by the whole file, so a
# new pytest marker or lint setting does not rebuild the environment
KEY=$(sed -n '/^\[build-system\]/,/^\[project.scripts\]/p' "$ROOT/pyproject.toml" | sha256sum | cut -c1-12)
VENV=$CACHE/venv-$KEY
mkdir -p "$CACHE"
if [ ! -f "$VENV/.complete" ]; then
  echo "spantrain: creating the Python environment in $VENV (first run: torch is large)" >&2
  rm -rf "$VENV"
  "$PYTHON_BIN" -m venv "$VENV"
  # setuptools and wheel in the environment itself let the re-pointing below build offline
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip "setuptools>=77" wheel
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[all,dev]"
  touch "$VENV/.complete"
fi
# the checkout may have moved (CI clones afresh): re-point the editable install, no downloads
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT" >/dev/null
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH"
