#!/usr/bin/env bash
# Create or refresh <repo>/.venv with the pinned Python packages the
# integration tests run (runzeo and real ZEO clients).
#
# Fast path: if .venv exists and its stamp holds the sha256 of the current
# requirements.txt, do nothing and print nothing. Otherwise (re)install.
# Usage: scripts/ensure-venv.sh   (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
req="$root/requirements.txt"
stamp="$venv/.requirements.stamp"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "ensure-venv: installing $req into $venv" >&2
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-virtualenv -r "$req"
# Only a complete install writes the stamp, so an interrupted one is retried.
echo "$want" > "$stamp"
