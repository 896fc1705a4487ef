#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py says what it runs and writes):
#
#   bash scripts/gpu_check.sh                          # on a CUDA machine: install, GPU tests, bench, every task
#   bash scripts/gpu_check.sh device=cpu size=tiny     # the dry run, anywhere
#
# On the lent GPU machine (Python 3.12 with its own torch, no network), first, here:
#   python scripts/gpu_wheels.py gl=true               # .whl/ and .gl/ (git-ignored), ~30 MiB
# then a device call with carry [".whl", ".gl"] and the command `bash scripts/gpu_check.sh`;
# the reports land under $OUT/results/ and come back.
#
# PYTHON picks the interpreter (default: python3, the machine's own, the one that holds torch there).
set -u
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
