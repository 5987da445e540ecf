#!/usr/bin/env bash
# The full benchmark sweep (several minutes): both dtypes, every SIMD path, 1..max threads,
# the slow peers at every size too. Results go to bench-results/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p bench-results
stamp="$(date +%Y%m%d-%H%M%S)"
plot=()
"$PY" -c "import matplotlib" 2>/dev/null && plot=(--plot "bench-results/full-$stamp.png")
"$PY" -m fastadam bench --dtype float32,float64 --simd all --threads all --slow-limit 0 \
    --json "bench-results/full-$stamp.json" "${plot[@]}" "$@" | tee "bench-results/full-$stamp.txt"
