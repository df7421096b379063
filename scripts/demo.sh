#!/usr/bin/env bash
# The whole pipeline on one machine (no Slurm, no GPU needed), on data you can recognise:
#   scikit-learn's handwritten digits (8x8 images, 10 classes) -> checksummed HDF5 shards
#   -> CNN trained on 2 MPI ranks -> registry add + promote + verify -> batch predictions on 2 ranks
#   -> accuracy recomputed from the predictions, where everything is, what to try next.
#
#   HPC_DEMO        digits (default) | images (synthetic 3x16x16 images through the streaming reader)
#   HPC_DEMO_DIR    where the artifacts go (default: <repo>/demo-out)
#   HPC_DEMO_NPROC  ranks for training and scoring (default 2)
#   HPC_VENV, HPC_TORCH_SPEC: see scripts/_env.sh (the demo installs the suite with its [demo] extra:
#   scikit-learn for the data set, pandas to read the predictions as the summary shows)
set -euo pipefail
T0=$(date +%s.%N)
HPC_EXTRAS="${HPC_EXTRAS:-demo}"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
T1=$(date +%s.%N)

DEMO="${HPC_DEMO:-digits}"
OUT="${HPC_DEMO_DIR:-$REPO/demo-out}"
NPROC="${HPC_DEMO_NPROC:-2}"
RUN_ID="demo-$(date +%Y%m%d-%H%M%S)"
export HPC_REGISTRY="$OUT/registry"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

case "$DEMO" in
  digits)
    CONFIG=digits_cnn; MODEL=digits-cnn; DATA="$OUT/digits"
    what="scikit-learn's handwritten digits (1,797 8x8 images, 10 classes)"
    make_data() { hpc data shard --from sklearn:digits --out "$DATA"; } ;;
  images)
    CONFIG=demo_images; MODEL=demo-cnn; DATA="$OUT/data"
    what="synthetic 3x16x16 images (10 class templates at random positions, noise 1.0)"
    make_data() {
      hpc data synth --kind images --samples 12000 --classes 10 --channels 3 --size 16 --noise 1.0 \
          --samples-per-shard 2000 --seed 0 --out "$DATA"
    } ;;
  *) echo "error: HPC_DEMO=$DEMO: valid are digits, images" >&2; exit 2 ;;
esac

if [ ! -f "$DATA/test/manifest.json" ]; then
  step "1/5 data: $what -> checksummed HDF5 shards"
  make_data
else
  step "1/5 data: reusing $DATA"
fi
hpc data verify "$DATA" --quick

step "2/5 train: $CONFIG on $NPROC MPI ranks (hpc/configs/$CONFIG.yaml)"
hpc train "$CONFIG" data.dir="$DATA" out_dir="$OUT/runs" run_id="$RUN_ID" --nproc "$NPROC"
RUN_DIR="$OUT/runs/$CONFIG/$RUN_ID"

step "3/5 registry: add the best model, promote it to production, verify its checksums"
VERSION=$(hpc registry add "$RUN_DIR" --name "$MODEL" --from best | tail -1 | grep -oE '[0-9]+$')
hpc registry promote "$MODEL" "$VERSION" --alias production
hpc registry verify "$MODEL@production"

step "4/5 infer: score the test split with $MODEL@production on $NPROC ranks"
PRED="$OUT/predictions/$RUN_ID"
hpc infer --model "$MODEL@production" --input "$DATA/test" --output "$PRED" --format parquet \
    --nproc "$NPROC"

step "5/5 summary"
T2=$(date +%s.%N)
python - "$RUN_DIR" "$PRED" "$DATA" "$OUT" "$CONFIG" "$MODEL" "$VERSION" "$T0" "$T1" "$T2" <<'PY'
import json, sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from hpc.data import load_manifest

run, pred, data, out = map(Path, sys.argv[1:5])
config, model, version = sys.argv[5:8]
t0, t1, t2 = map(float, sys.argv[8:11])
s = json.loads((run / "summary.json").read_text())
trainer_acc = s["metrics"].get("test", {}).get("accuracy", float("nan"))

# The accuracy a user would compute: the predictions file joined to the true labels by row id.
preds = pd.read_parquet(pred).sort_values("row_id")
m = load_manifest(data / "test")
labels = np.concatenate([h5py.File(m.shard_path(i), "r")["y"][:] for i in range(len(m.shards))])
if len(preds) != len(labels) or not (preds["row_id"].to_numpy() == np.arange(len(labels))).all():
    sys.exit(f"error: {pred} has {len(preds)} rows for {len(labels)} test samples, or row ids are not "
             "each present once")
acc = float((preds["prediction"].to_numpy() == labels).mean())
classes = int(labels.max()) + 1
majority = float(np.bincount(labels).max() / len(labels))

print(f"test accuracy, recomputed from the {len(preds)} predictions: {acc:.4f}")
print(f"  (trainer's own figure, all-reduced over {s['world_size']} ranks: {trainer_acc:.4f}; "
      f"chance: {1 / classes:.2f} guessing, {majority:.2f} always the most frequent class)")
print(f"training: {s['step']} steps on {s['world_size']} ranks ({s['backend']}), "
      f"{s.get('samples_per_s', 0):,.0f} samples/s, {s.get('wall_s', 0):.1f} s in the trainer")
print()
print(f"data         {data}")
print(f"run          {run}   (summary.json, metrics.jsonl, logs/, checkpoints/)")
print(f"registry     {out / 'registry'}/{model}   (version {version}, alias production)")
print(f"predictions  {pred}   ({len(preds)} rows; pandas.read_parquet('{pred}'))")
print()
print("try next:")
print("  # where a run stands: step, loss, ETA, per-rank heartbeats (live while it runs; --watch refreshes)")
print(f"  hpc status {run}")
print("  # a self-contained HTML page: loss, learning rate, gradient norm, throughput, goodput")
print(f"  hpc report {run}")
print("  # the Slurm batch script `hpc submit` would send (drop --dry-run on a cluster)")
print(f"  hpc submit train {config} data.dir={data} out_dir={out / 'runs'} --nodes 1 --tasks-per-node 2 --dry-run")
print(f"  # the registry of this demo: export HPC_REGISTRY={out / 'registry'}; hpc registry show {model}@production")
print()
print(f"time: {t2 - t0:.0f} s from ./scripts/demo.sh to this summary "
      f"({t1 - t0:.0f} s installing, {t2 - t1:.0f} s the pipeline)")
PY
