#!/usr/bin/env bash
# Set up and run the main job: extend DeiT-tiny's 1000 ImageNet classes with "raccoon",
# trained on a folder of raccoon photos, then print top-5 predictions for three of the photos.
#   MODEL: hub id or local folder (default: the shared copy beside this repo, else the hub id)
#   DATA:  a flat folder of photos of the new class (default: ../shared/data/raccoon)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=${MODEL:-$( [ -d ../shared/models/deit-tiny-patch16-224 ] && echo ../shared/models/deit-tiny-patch16-224 || echo facebook/deit-tiny-patch16-224 )}
DATA=${DATA:-../shared/data/raccoon}
LABEL=${LABEL:-raccoon}
OUT=${OUT:-runs/demo-raccoon}
NEG=${NEGATIVES:-runs/demo-negatives}
if [ ! -d "$DATA" ]; then echo "no data folder at $DATA: set DATA=/path/to/photos" >&2; exit 2; fi
# unlabelled photos of other things, so the model learns where "raccoon" ends
python -m vitlora.negatives "$NEG" >/dev/null
vitlora train "$DATA" --label "$LABEL" --model "$MODEL" --negatives "$NEG" --out "$OUT" --overwrite ${EXTRA_ARGS:-}
vitlora info "$OUT"
vitlora predict "$OUT" $(ls "$DATA"/*.jpg | tail -n 3) --top-k 5
