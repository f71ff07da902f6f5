#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one short run (about 5 minutes of one GPU), for a session
# that is lent one: eager, compiled and CUDA-graph updates at batch 256 and 1024, at the pipeline's
# 64x64 size and the 256x256 reference size, and K seeds in one vectorised update.
# Until it has run, docs/performance.md says the CUDA path has never run.
#   bash benchmarks/gpu.sh            # writes its outputs under ${OUT:-gpu-results}/
set -euo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$out/torch.txt"
for batch in 256 1024; do
  python benchmarks/cql_update.py --device cuda --compile --cudagraph --batch "$batch" --hidden 64 --obs-dim 3 \
    --act-dim 1 --seconds 3 --warmup 1 | tee "$out/cql_update_64_batch$batch.txt"
  python benchmarks/cql_update.py --device cuda --compile --cudagraph --batch "$batch" --seconds 3 --warmup 1 \
    | tee "$out/cql_update_256_batch$batch.txt"
done
python benchmarks/multi_seed_update.py --device cuda --seeds 8 --seconds 3 | tee "$out/multi_seed_8.txt"
python benchmarks/multi_seed_update.py --device cuda --seeds 32 --seconds 3 | tee "$out/multi_seed_32.txt"
