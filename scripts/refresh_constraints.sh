#!/usr/bin/env bash
# Write constraints.txt from a virtual environment in which the whole suite just passed.
#
# Usage: bash scripts/refresh_constraints.sh [VENV]   (default: .venv, the one `.ci/run` leaves behind)
#
# The intended flow (docs/development.md): `PEFT_PERFT_CONSTRAINTS=none bash .ci/run` installs the newest releases
# and runs everything; only if it passes, this script records that environment's exact versions, and the change to
# constraints.txt is committed on purpose, like any other change. The scheduled job in
# .github/workflows/newest-releases.yml does the same and uploads the file when it is green.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "refresh_constraints.sh: no Python at $venv/bin/python; run 'PEFT_PERFT_CONSTRAINTS=none bash .ci/run' first, or pass the virtual environment's folder." >&2
    exit 2
fi
{
    echo "# The versions the whole suite last passed with: .ci/run installs the project with these as constraints."
    echo "# Written by scripts/refresh_constraints.sh from a green run on the newest releases; see docs/development.md."
    echo "# The torch line has no local label, so it admits both the CPU (+cpu) and the default build of that version."
    "$venv/bin/python" -m pip list --format=freeze --exclude-editable \
        | grep -viE '^(pip|setuptools|wheel|peft-perft|peft_perft)==' \
        | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
        | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages from $venv"
