#!/usr/bin/env bash
# The GPU sweep committed under reports/ (issues 4 and 5): run from the repository root on a CUDA machine.
#
#   scripts/gpu_sweep.sh [bench|tests|all]     (default all)
#
# bench: `lorabench bench` on Llama-3-8B cut to 4 layers, bf16, every method at r=8 and r=64, lorabench's
#        layers and transformers + PEFT (q,v and all-linear), with and without gradient checkpointing.
# tests: the CUDA tests and benchmarks (pytest -m cuda), then `lorabench report --bench` for reports/.
# The two parts fit one 10-minute call each. Everything is written under a work folder and packed as
# ${OUT:-gpu-out}/gpu-<part>.tgz, one file to fetch whatever the number of logs.
set -uo pipefail
part=${1:-all}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
work=${WORK:-/tmp/lorabench-gpu}/$part
mkdir -p "$work" "${OUT:-gpu-out}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/nvidia-smi.csv"
python -c "import torch, transformers, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)" > "$work/versions.txt"
cat "$work/nvidia-smi.csv" "$work/versions.txt"

if [[ $part == bench || $part == all ]]; then
  common=(-m llama-3-8b --layers 4 --method all -r 8 -r 64 --steps 10 --warmup 3 --no-progress)
  run() {  # name, extra options
    local name=$1; shift
    echo "== bench $name"
    python -m lorabench bench "${common[@]}" "$@" -o "$work/bench_$name.json" 2>&1 | tee "$work/bench_$name.txt"
  }
  run lorabench_qv --impl lorabench
  run lorabench_qv_ckpt --impl lorabench --grad-checkpointing
  run peft_qv --impl peft
  run peft_alllinear --impl peft --targets all-linear
  run peft_alllinear_ckpt --impl peft --grad-checkpointing --targets all-linear
fi

if [[ $part == tests || $part == all ]]; then
  echo "== pytest -m cuda"
  python -m pytest -q -p no:cacheprovider -m cuda tests benchmarks --benchmark-enable \
    --benchmark-json="$work/benchmarks.json" 2>&1 | tee "$work/pytest_cuda.txt" | tail -40
  echo "== report"
  python -m lorabench report -m llama-3-8b --bench --impl lorabench --layers 4 --method all -r 8 -r 16 -r 64 \
    --steps 10 --warmup 3 --gpu H100-80GB --out-dir "$work/reports" --name h100-llama-3-8b 2>&1 | tail -3
fi

tar czf "${OUT:-gpu-out}/gpu-$part.tgz" -C "$(dirname "$work")" "$part"
