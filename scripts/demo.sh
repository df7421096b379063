#!/usr/bin/env bash
# The main job on its embedded default, end to end, on one machine (no Slurm, no GPU needed):
#   synthetic images -> HDF5 shards -> CNN trained on 2 MPI ranks -> registry add + promote
#   -> batch predictions (parquet) -> a summary of where everything is.
#
#   HPC_DEMO_DIR   where the artifacts go (default: <repo>/demo-out)
#   HPC_DEMO_NPROC ranks for training and scoring (default 2)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"

OUT="${HPC_DEMO_DIR:-$REPO/demo-out}"
NPROC="${HPC_DEMO_NPROC:-2}"
RUN_ID="demo-$(date +%Y%m%d-%H%M%S)"
export HPC_REGISTRY="$OUT/registry"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

if [ ! -f "$OUT/data/test/manifest.json" ]; then
  step "1/5 data: synthetic 3x16x16 images, 10 classes -> checksummed HDF5 shards"
  hpc data synth --kind images --samples 12000 --classes 10 --channels 3 --size 16 --noise 1.0 \
      --samples-per-shard 2000 --seed 0 --out "$OUT/data"
else
  step "1/5 data: reusing $OUT/data"
fi
hpc data verify "$OUT/data" --quick

step "2/5 train: CNN on $NPROC MPI ranks (hpc/configs/demo_images.yaml)"
hpc train demo_images data.dir="$OUT/data" out_dir="$OUT/runs" run_id="$RUN_ID" train.progress=false \
    --nproc "$NPROC"
RUN_DIR="$OUT/runs/demo_images/$RUN_ID"

step "3/5 registry: add the best model and promote it to production"
VERSION=$(hpc registry add "$RUN_DIR" --name demo-cnn --from best | tail -1 | grep -oE '[0-9]+$')
hpc registry promote demo-cnn "$VERSION" --alias production
hpc registry verify demo-cnn@production

step "4/5 infer: score the test split with demo-cnn@production on $NPROC ranks"
PRED="$OUT/predictions/$RUN_ID"
hpc infer --model demo-cnn@production --input "$OUT/data/test" --output "$PRED" --format parquet \
    --nproc "$NPROC"

step "5/5 summary"
python - "$RUN_DIR" "$PRED" "$OUT" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
run, pred, out = map(Path, sys.argv[1:])
s = json.loads((run / "summary.json").read_text())
test = s["metrics"].get("test", {})
table = pq.read_table(pred).to_pandas()
import h5py, numpy as np
from hpc.data import load_manifest
m = load_manifest(out / "data" / "test")
labels = np.concatenate([h5py.File(m.shard_path(i), "r")["y"][:] for i in range(len(m.shards))])
acc = float((table.sort_values("row_id")["prediction"].to_numpy() == labels).mean())
print(f"test accuracy (trainer, all-reduced over {s['world_size']} ranks): {test.get('accuracy', float('nan')):.4f}")
print(f"test accuracy (from the predictions, recomputed here):           {acc:.4f}   (chance: 0.10)")
print(f"samples/s in training: {s.get('samples_per_s', 0):,.0f}   wall: {s.get('wall_s', 0):.1f} s")
print()
print(f"data       {out / 'data'}            (hpc data verify {out / 'data'})")
print(f"run        {run}   (summary.json, metrics.jsonl, logs/, checkpoints/)")
print(f"registry   {out / 'registry'}/demo-cnn   (HPC_REGISTRY={out / 'registry'} hpc registry show demo-cnn@production)")
print(f"predictions {pred}   ({len(table)} rows)")
print()
print("read them with pandas:")
print(f"  python -c \"import pandas as pd; print(pd.read_parquet('{pred}').head())\"")
PY
