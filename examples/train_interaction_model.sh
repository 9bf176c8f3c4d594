#!/usr/bin/env bash
# The shipped interaction model, from scratch: three `microturn train` runs, each from the
# previous one's adapter (docs/MODEL_CARD.md says why each). About 2 h 30 min on 2 vCPUs.
# Run it again after a stop: each run resumes from its last checkpoint, a finished one is done.
set -euo pipefail
microturn train --out runs/im1 --per-family 24 --rounds 8 --steps 450 --batch-size 4 \
  --lr 1e-3 --warmup 20 --lora-rank 8 --lora-alpha 16 --train-frontend --val-every 150 \
  --val-per-family 4 --checkpoint-every 25 && \
microturn train --out runs/im2 --init-adapter runs/im1/adapter.safetensors --per-family 24 \
  --rounds 8 --family-weights time=3,cue_audio=2,cue_visual=2,cue_text=2,backchannel=2 \
  --moment-weight 3 --steps 450 --batch-size 4 --lr 5e-4 --warmup 10 --lora-rank 8 \
  --lora-alpha 16 --train-frontend --val-every 150 --val-per-family 4 --checkpoint-every 25 && \
microturn train --out runs/im3 --init-adapter runs/im2/adapter.safetensors --per-family 24 \
  --rounds 8 --family-weights time=3,cue_audio=2,cue_visual=2,cue_text=2,backchannel=2 \
  --moment-weight 3 --steps 160 --batch-size 4 --lr 3e-4 --warmup 5 --lora-rank 8 \
  --lora-alpha 16 --train-frontend --val-every 0 --val-per-family 4 --checkpoint-every 20 && \
cp runs/im3/adapter.safetensors microturn/models/interaction-smollm2-135m.safetensors

