#!/usr/bin/env bash
# DDP smoke test of the tokenizer at the paper shape on every GPU of this machine (about 3-5 minutes on one
# H100/H200, most of it building the SigLIP2-L teacher and encoder; no downloads, nothing needs to exist):
#   - the paper config (tokenizer/evotok_paper: SigLIP2-L/16 encoder, 16x16x32 latents, K=32768, Lpix=4/Lsem=16,
#     LPIPS, discriminator from step GAN_START) with random weights: teacher.random_init=true model.encoder_weights=
#     and an LPIPS backbone file written here from torchvision's vgg16(weights=None),
#   - a folder of random 256 px images written here (data.source=folder), BATCH images per GPU,
#   - trainer.devices = the number of GPUs, trainer.strategy from the config (DDP, find_unused_parameters: the
#     discriminator is idle in the generator's backward), Lightning's launcher re-running the driver per GPU,
#   - prints, per rank, the peak GPU memory and the steps/s after the first (warm-up) steps, and checks that every
#     rank ends with the same parameters and codebooks (a checksum per rank).
# Usage: experiments/gpu/ddp_smoke.sh [PYTHON]   (default: .venv/bin/python, else python3)
# Environment: STEPS (default 8), BATCH (per GPU, default 2), GAN_START (default 4), STRATEGY (default: the
# config's), PRECISION (default bf16-mixed). Writes $OUT/ddp_smoke.json (or results/ddp_smoke.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
if [[ "$NGPU" -lt 1 ]]; then
  echo "ddp_smoke: no CUDA device on this machine" >&2
  exit 2
fi
STEPS="${STEPS:-8}"
BATCH="${BATCH:-2}"
GAN_START="${GAN_START:-4}"
PRECISION="${PRECISION:-bf16-mixed}"
OUT_DIR="${OUT:-results}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/evotok_ddp_smoke.XXXXXX")"
mkdir -p "$OUT_DIR"
echo "ddp_smoke: $NGPU GPU(s), $STEPS steps, batch $BATCH per GPU, work folder $WORK"

# random LPIPS backbone and random images
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

work = Path(sys.argv[1])
torch.save(torchvision.models.vgg16(weights=None).state_dict(), work / "vgg16_random.pth")
img = work / "images"
img.mkdir()
rng = np.random.default_rng(0)
for i in range(256):
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(img / f"{i:04d}.png")
EOF

# the driver of one rank: Lightning re-runs this file for ranks 1.. (so it is a file, not a heredoc on stdin)
cat > "$WORK/driver.py" <<'EOF'
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

from evotok.config import load_config
from evotok.lit import train as train_mod

out, overrides = Path(sys.argv[1]), sys.argv[2:]
WARM = 2  # steps not timed (allocator warm-up, cuDNN autotuning, the discriminator's first step)


class Measure(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        n = len(self.times) - 1 - WARM
        rate = n / (self.times[-1] - self.times[WARM]) if n > 0 else float("nan")
        checksum = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
        codebooks = sum(float(b.detach().double().sum()) for k, b in pl_module.named_buffers() if "ema" in k)
        rec = {"rank": trainer.global_rank, "world": trainer.world_size, "strategy": type(trainer.strategy).__name__,
               "device": torch.cuda.get_device_name(pl_module.device), "steps": len(self.times),
               "steps_per_s": rate, "images_per_s": rate * int(trainer.datamodule.cfg.data.batch_size),
               "peak_mem_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30,
               "peak_reserved_gib": torch.cuda.max_memory_reserved(pl_module.device) / 2**30,
               "param_checksum": checksum, "codebook_checksum": codebooks}
        print("ddp_smoke rank", json.dumps(rec), flush=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(rec))


build = train_mod.build_trainer


def build_measuring(*a, **k):
    trainer = build(*a, **k)
    trainer.callbacks.append(Measure())
    return trainer


train_mod.build_trainer = build_measuring
train_mod.train(load_config("tokenizer/evotok_paper", overrides, stage="tokenizer"), "tokenizer", argv=sys.argv)
EOF

mkdir -p "$WORK/out"
EXTRA=()
if [[ -n "${STRATEGY:-}" ]]; then EXTRA+=("trainer.strategy=$STRATEGY"); fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$WORK/driver.py" "$WORK/out" \
  teacher.random_init=true teacher.weights= teacher.cache_features=false model.encoder_weights= \
  "loss.lpips_weights=$WORK/vgg16_random.pth" "loss.gan_start=$GAN_START" \
  data.source=folder "data.root=$WORK/images" data.val_root= data.num_workers=2 \
  data.train_size=200 data.val_size=28 data.test_size=28 "data.batch_size=$BATCH" \
  trainer.accelerator=gpu "trainer.devices=$NGPU" trainer.num_nodes=1 "trainer.precision=$PRECISION" \
  trainer.global_batch_size=0 trainer.accumulate=1 "trainer.max_steps=$STEPS" "trainer.val_every_n_steps=$STEPS" \
  trainer.limit_val_batches=1 trainer.ckpt_every_n_steps=1000000 trainer.image_log_every_n_steps=0 \
  trainer.log_every_n_steps=1 trainer.progress_bar=false trainer.threads=4 \
  "run.dir=$WORK/runs" run.name=ddp_smoke "${EXTRA[@]}"

"$PY" - "$WORK/out" "$NGPU" "$OUT_DIR/ddp_smoke.json" <<'EOF'
import json
import sys
from pathlib import Path

out, ngpu, dest = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ngpu)]
same = all(r["param_checksum"] == ranks[0]["param_checksum"] and r["codebook_checksum"] == ranks[0]["codebook_checksum"]
           for r in ranks)
summary = {"gpus": ngpu, "ranks": ranks, "identical_across_ranks": same,
           "steps_per_s": min(r["steps_per_s"] for r in ranks),
           "peak_mem_gib": max(r["peak_mem_gib"] for r in ranks)}
dest.write_text(json.dumps(summary, indent=2) + "\n")
print(f"ddp_smoke: {ngpu} x {ranks[0]['device']}, {ranks[0]['strategy']}: {summary['steps_per_s']:.2f} steps/s, "
      f"peak memory {summary['peak_mem_gib']:.1f} GiB allocated per GPU; ranks identical: {same}; {dest}")
sys.exit(0 if same else 1)
EOF
