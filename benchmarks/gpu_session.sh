#!/usr/bin/env bash
# Every CUDA check in one run, for a lent GPU machine (about 10 minutes on one H200): the CUDA-only tests, then
# each benchmark's GPU figures, each step bounded by `timeout` so one hang cannot eat the session. Output goes
# to stdout and, per step, to $OUT (or ./gpu-session) as .log files.
#
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl     # faiss-cpu etc. carried as wheels
#   PYTHONPATH=/tmp/site:. bash benchmarks/gpu_session.sh
set -u
out="${OUT:-gpu-session}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-.}"
export SSL_BENCH_CACHE="${SSL_BENCH_CACHE:-/tmp/ssl-bench-cache}"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v "it/s]" | tail -25
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

step env 30 python -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
step cuda-tests 240 python -m pytest -q -p no:cacheprovider -k "cuda or nvjpeg" tests/test_device_augment.py tests/test_decode.py \
  tests/test_knn.py tests/test_prototypes_unique.py
step nccl 120 torchrun --nproc_per_node 1 -m ssl_bench.cli -q pretrain --preset tiny_cpu --data builtin:digits \
  --out /tmp/nccl-run --device cuda epochs=1 augment=device
step pretrain-step 300 python benchmarks/pretrain_step.py --presets dino_vits16 --batch-size 128 --device cuda --steps 10
step pretrain-compile 300 python benchmarks/pretrain_step.py --presets dino_vits16 --batch-size 128 --device cuda \
  --steps 10 --methods dino,dino-vmf --compile
step data-pipeline 240 python benchmarks/data_pipeline.py --device cuda --images 2048 --workers 15 --batch-size 256
step extract 180 python benchmarks/extract.py --device cuda --images 2048 --batch-size 256 --workers 15
step knn 180 python benchmarks/knn.py --device cuda --n-train 1281167 --n-test 50000
step davis 180 python benchmarks/davis_propagation.py --device cuda --frames 40 --steps 60
step pretrain-end-to-end 420 python benchmarks/pretrain_step.py --presets dino_vits16 --batch-size 128 --device cuda \
  --methods dino --steps 20 --end-to-end 3072 --workers 15
