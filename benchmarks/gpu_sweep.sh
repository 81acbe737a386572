#!/usr/bin/env bash
# Recipe sweep on a lent GPU (minutes of device time), each run appended to $OUT/*.jsonl as it finishes:
# extend folds (capped new rows vs uncapped, with and without negatives), replace-mode variants on cat
# breeds, then the CUDA tests. Data: VITLORA_SHARED=<copy of ../shared> (downscaled photos travel under
# the 64 MiB limit). Usage: OUT=dir bash benchmarks/gpu_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
S="python3 benchmarks/sweep.py"
W=$(mktemp -d)
timeout ${T0:-90} python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > $OUT/pytest-cuda.log 2>&1
echo "pytest tests/test_cuda.py: exit $?" >> $OUT/pytest-cuda.log
timeout ${T1:-200} $S extend --folds 0 1 2 3 4 --workdir $W/e --out $OUT/extend.jsonl --variants default \
  cap0:row_norm_cap=0 posonly:negatives=null posonly-cap0:negatives=null,row_norm_cap=0 > $OUT/extend.log 2>&1
timeout ${T2:-100} $S replace --seeds 2 3 4 --workdir $W/r --out $OUT/replace.jsonl --variants default \
  r16:rank=16,alpha=32 > $OUT/replace.log 2>&1
tail -n 4 $OUT/pytest-cuda.log; tail -n 16 $OUT/extend.log $OUT/replace.log
