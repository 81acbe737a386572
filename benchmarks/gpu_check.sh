#!/usr/bin/env bash
# The GPU checks in one script (a lent CUDA machine has minutes, not hours):
#   1. the CUDA paths: fp16 and bf16 autocast training, DDP over NCCL under torchrun, predict on cuda,
#      and the CUDA tests (tests/test_cuda.py: extend / stacking / negatives / the recipe flags on cuda);
#   2. `bench.py --gpu`: the PEFT guide's Trainer recipe vs `vitlora train` on ViT-base/16, same card.
# The hub is unreachable from these machines, so ViT-base/16 is built from its config with random
# weights (speed is what is compared; accuracy of a random-init model says nothing and is not reported).
# The reference needs `datasets` (carry its wheel where the machine lacks it).
# Usage: [ONLY_BENCH=1] DATA=/path/to/photos GUIDE=/path/to/imagefolder OUT=/results bash benchmarks/gpu_check.sh [repeats]
set -uo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-2}
OUT=${OUT:-/tmp/gpu-out}
DATA=${DATA:-../shared/data/raccoon}
GUIDE=${GUIDE:-../shared/data/cat-breeds}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
W=$(mktemp -d)
python3 - "$W" <<'EOF' 2>&1 | tee "$OUT/env.txt"
import json, sys, torch
from transformers import ViTConfig, ViTForImageClassification
w = sys.argv[1]
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "bf16", torch.cuda.is_bf16_supported())
for name, cfg in {"vit-base": ViTConfig(), "tiny": ViTConfig(hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)}.items():
    cfg.num_labels = 1000 if name == "vit-base" else 8
    cfg.id2label = {i: f"class_{i}" for i in range(cfg.num_labels)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    ViTForImageClassification(cfg).save_pretrained(f"{w}/{name}")
    size = 224 if name == "vit-base" else 32
    json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": True,
               "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
               "image_std": [0.5] * 3}, open(f"{w}/{name}/preprocessor_config.json", "w"))
EOF
printf "import sys\nfrom vitlora.cli import main\nsys.exit(main())\n" > "$W/v.py"
V="python3 $W/v.py"
status() { echo "== $1: exit $2" | tee -a "$OUT/cuda_paths.txt"; }
if [ -z "${ONLY_BENCH:-}" ]; then  # ONLY_BENCH=1: step 2 alone
for p in fp16 bf16; do
  $V train "$GUIDE" --model "$W/tiny" --out "$W/run-$p" --epochs 1 --device cuda --precision $p \
    > "$OUT/train-$p.log" 2>&1; status "train cuda $p" $?
done
$V predict "$W/run-bf16" "$DATA" --device cuda --json "$W/p.json" > "$OUT/predict.log" 2>&1; status "predict cuda" $?
torchrun --standalone --nproc_per_node=1 "$W/v.py" train "$GUIDE" --model "$W/tiny" --out "$W/run-ddp" \
  --epochs 1 --device cuda > "$OUT/ddp.log" 2>&1; status "torchrun nccl" $?
python3 -m pytest -q -rs tests/test_cuda.py tests/test_data.py -k cuda > "$OUT/pytest-cuda.log" 2>&1
status "pytest tests/test_cuda.py, test_data -k cuda" $?
fi
python3 benchmarks/bench.py --gpu --model "$W/vit-base" --guide-data "$GUIDE" --data "$DATA" \
  --repeats "$REPEATS" --out "$OUT/gpu-guide.json" --save > "$OUT/bench.log" 2>&1; status "bench --gpu" $?
cp benchmarks/results/gpu-guide-*.md "$OUT/" 2>/dev/null
tail -n 30 "$OUT/bench.log"; cat "$OUT/cuda_paths.txt"
