#!/usr/bin/env bash
# The long-tail study on builtin:digits-lt (issue 10): the tiny DINO-vMF preset pretrained with and without
# KoLeo-Proto at the same budget and seeds, then kNN and linear probes with shot-group accuracies and the
# prototypes task on each checkpoint, then `ssl-bench report --study longtail`.
#
#   bash benchmarks/longtail_study.sh [OUT]     (default OUT=studies/longtail; about 4 min per run on 2 cores)
#
# Settings by environment: SEEDS (default "0 1 2"), KOLEO (KoLeo-Proto weights, 0 = without; default "0 0.1"),
# EPOCHS (default 40: digits-lt has 322 training images, 5 steps per epoch, so 200 steps, about the tiny preset's
# 210 on builtin:digits). Finished runs are resumed, not redone; result rows append to OUT/results/runs.csv.
set -euo pipefail

out=${1:-studies/longtail}
seeds=${SEEDS:-0 1 2}
weights=${KOLEO:-0 0.1}
epochs=${EPOCHS:-40}
results="$out/results/runs.csv"
mkdir -p "$out/results"

for seed in $seeds; do
  for weight in $weights; do
    name="dino-vmf-koleo${weight}-s${seed}"
    run="$out/runs/$name"
    if [ -f "$run/checkpoint.pth" ]; then resume=(--resume); else resume=(); fi
    ssl-bench -q pretrain --preset tiny_cpu --data builtin:digits-lt --out "$run" "${resume[@]}" \
      epochs="$epochs" seed="$seed" koleo_weight="$weight"
    label="DINO-vMF tiny $([ "$weight" = 0 ] && echo "" || echo "+ KoLeo-Proto $weight ")seed $seed"
    ssl-bench -q run --task knn,linear,prototypes --ckpt "$run/checkpoint.pth" --data builtin:digits-lt \
      --workers 0 --results "$results" --label "$label" --method dino-vmf -p linear.fast=true --seed "$seed" \
      > /dev/null
  done
done
# the same ViT at random init: what the probes give without pretraining
ssl-bench -q run --task knn,linear --model vit_nano_patch4_32 --data builtin:digits-lt --workers 0 \
  --results "$results" --label "vit_nano random init" -p linear.fast=true > /dev/null
ssl-bench report --study longtail --results-dir "$out/results" --dataset digits-lt
