#!/bin/bash
# --jobs 1 against --jobs 2 on the acdc-cpu shapes: 4 cells (unimatch, crossmatch x seeds 0, 1), 30 iterations
# each, evaluation on valtest, a 1-step timing (so that the serial timing phase costs little). Run from anywhere
# on an otherwise idle machine; prints the wall time of each and keeps the rows in OUT/j1, OUT/j2.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
OUT=${OUT:-$(mktemp -d)}
for j in 1 2; do
  start=$(date +%s.%N)
  semiseg bench --preset acdc-cpu --algos unimatch,crossmatch --seeds 0,1 --iterations 30 \
     --timing-warmup 0 --timing-iters 1 --out "$OUT/j$j" --jobs $j --quiet
  end=$(date +%s.%N)
  echo "jobs $j: $(echo "$end - $start" | bc) s"
done
