#!/usr/bin/env bash
# On a CUDA machine: build, run the GPU-only tests (marked `cuda`) and every benchmark on the GPU.
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
make build
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'"
TRITON_INTERPRET=0 .venv/bin/python -m pytest tests -m cuda -q
.venv/bin/python benchmarks/run.py --device cuda
