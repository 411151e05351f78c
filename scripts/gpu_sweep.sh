#!/usr/bin/env bash
# The GPU sweep committed under reports/ (issue 4 and 5): run from the repository root on a CUDA machine.
# Writes everything under ${OUT:-gpu-out}/ and packs it as one tarball.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-gpu-out}/run
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv"
python -c "import torch, transformers, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)" > "$out/versions.txt"
common=(-m llama-3-8b --layers 4 --method all -r 8 -r 64 --steps 10 --warmup 3 --no-progress)
python -m lorabench bench "${common[@]}" --impl lorabench -o "$out/bench_lorabench_qv.json" | tee "$out/bench_lorabench_qv.txt"
python -m lorabench bench "${common[@]}" --impl lorabench --grad-checkpointing -o "$out/bench_lorabench_qv_ckpt.json" | tee "$out/bench_lorabench_qv_ckpt.txt"
python -m lorabench bench "${common[@]}" --impl peft -o "$out/bench_peft_qv.json" | tee "$out/bench_peft_qv.txt"
python -m lorabench bench "${common[@]}" --impl peft --targets all-linear -o "$out/bench_peft_alllinear.json" | tee "$out/bench_peft_alllinear.txt"
python -m lorabench bench "${common[@]}" --impl peft --grad-checkpointing --targets all-linear -o "$out/bench_peft_alllinear_ckpt.json" | tee "$out/bench_peft_alllinear_ckpt.txt"
python -m pytest -q -p no:cacheprovider -m cuda tests benchmarks --benchmark-enable --benchmark-json="$out/benchmarks.json" 2>&1 | tail -40 | tee "$out/pytest_cuda.txt"
python -m lorabench report -m llama-3-8b --bench --impl lorabench --layers 4 --method all -r 8 -r 16 -r 64 \
  --steps 10 --warmup 3 --gpu H100-80GB --out-dir "$out/reports" --name h100-llama-3-8b 2>&1 | tail -3
tar czf "${OUT:-gpu-out}/gpu-results.tgz" -C "${OUT:-gpu-out}" run
