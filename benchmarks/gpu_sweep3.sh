#!/usr/bin/env bash
# Round 3 (a lent GPU's last minutes): does extend mode need its later epochs? 5 raccoon folds, with and
# without negatives: default (auto-stop 2) vs auto-stop 1 vs 1 epoch. Usage: OUT=dir bash benchmarks/gpu_sweep3.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
W=$(mktemp -d)
timeout ${T1:-170} python3 benchmarks/sweep.py extend --folds 0 1 2 3 4 --workdir $W/e --out $OUT/extend.jsonl \
  --variants default as1:auto_stop=1 e1:epochs=1 posonly:negatives=null posonly-as1:negatives=null,auto_stop=1 \
  > $OUT/extend.log 2>&1
tail -n 12 $OUT/extend.log
