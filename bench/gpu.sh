#!/usr/bin/env bash
# The GPU benchmark of issue 16, ≤ 8 minutes end to end (it stops by itself): card, driver and torch build;
# advent and cram steps on DeepLab-v2 R101 multi-level at 512×1024, batch 1, in fp32 and bf16 + channels_last
# with peak memory; a 4-trial `python -m rayuda.tune cram` on minicity with --gpus-per-trial 0.5; a markdown
# table in OUT/gpu_bench.md (default ./gpu-bench).
#
#   bench/gpu.sh                 # on a machine with an NVIDIA GPU
#   bench/gpu.sh --dry-run       # CPU, tiny sizes: checks the script (tests/test_gpu_bench.py runs it)
#   bench/gpu.sh --skip-tune     # leave out the search; other options: see bench/gpu_bench.py --help
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python=python
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
fi
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(), "GPU available:", torch.cuda.is_available())'
# 8 minutes in all: the search inside has its own limit (--tune-seconds, 270 s by default)
exec timeout --signal=INT --kill-after=20 460 "$python" "$here/gpu_bench.py" "$@"
