#!/usr/bin/env bash
# Create .venv and install vitlora with everything the demo and the tests need.
# torch is pinned to 2.13.0 first: on the project's machines that is the local CPU build;
# anything looser pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[datasets,serve,onnx,openvino,augment,webdataset,tensorboard,mlflow,test]" 2>&1 | grep -v "is ignored" || true
python -c "import vitlora, torch, transformers, peft; print(f'vitlora {vitlora.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
