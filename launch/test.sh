#!/usr/bin/env bash
# Install molf_ds with its test dependencies on this machine, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./launch/install.sh
python -m pip install -q -e ".[gemma]"  # the suite loads Gemma 3 270M once (Gemma Terms of Use)
# A C++ kernel that fails to build fails the suite instead of skipping its tests (users get a warning and torch).
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false MOLF_DS_REQUIRE_CPP_KERNEL=1
python -m pytest -q "$@"
