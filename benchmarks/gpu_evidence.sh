#!/usr/bin/env bash
# GPU evidence in one command (docs/bench.md, "GPU evidence"): bench rows, `reparam verify` on
# CUDA and the SGS hooks' kernel count, in at most 8 minutes, into benchmarks/results/cuda-<date>/
# (one archive of it into $OUT when set). Extra arguments go to the Python entry point, e.g.
# --dry-run (CPU, tiny: checks the pipeline, is not GPU evidence) or --budget SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The entry point keeps its own budget (465 s by default); this is only a safety net.
exec timeout --signal=INT --kill-after=20 "${GPU_EVIDENCE_LIMIT_S:-500}" "${PYTHON:-python}" -m benchmarks.gpu_evidence "$@"
