# Sourced by scripts/test and scripts/demo: make (or refresh) the project's virtual environment.
# Needs only Python >= 3.11 and the package registries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY' || { echo "sottovoce needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(sys.version_info < (3, 11))
PY
VENV="${SOTTOVOCE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall whenever the project's metadata changed (or the venv is new). The install is a
# non-editable link tree (setuptools "strict" editable mode) so that mypy can follow it.
stamp="$VENV/.sottovoce-installed"
# The tests cover the aggregator: its ledger (torch, opacus) and its PostgreSQL backend (psycopg).
EXTRAS="${SOTTOVOCE_EXTRAS:-dev,aggregator}"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$(find device sync aggregator policy sim core -name '*.py' | sort | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing sottovoce[$EXTRAS] into $VENV" >&2
  log="$VENV/pip-install.log"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check \
      --config-settings editable_mode=strict -e ".[$EXTRAS]" >"$log" 2>&1; then
    cat "$log" >&2
    echo "pip install failed (log: $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
