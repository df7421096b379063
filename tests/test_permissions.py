"""Every file the suite writes is group-readable (and every directory group-listable) under the umasks
labs use (022, 027): data shards and manifests, the run directory (logs, metrics, summary,
checkpoints, models), registry versions and inference outputs. The writers run in a subprocess with
``os.umask`` set, as a job would.

safetensors' ``save_file`` writes its own private (0600) temporary file and renames it over the path
it is given, so weights were owner-only until ``hpc.util.io`` set the mode after the writer.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The whole pipeline in one process (one torch import): data -> train (checkpoints) -> registry -> infer.
SCRIPT = textwrap.dedent("""
    import os, sys
    os.umask(int(sys.argv[1], 8))
    from pathlib import Path
    from hpc.cli import main
    from hpc.data import SynthConfig, synth
    from hpc.train import run

    tmp = Path(sys.argv[2])
    synth(SynthConfig(kind="tabular", samples=200, features=6, classes=3, seed=1), tmp / "data",
          split="train=0.8,val=0.1,test=0.1")
    cfg = {"name": "perm", "out_dir": str(tmp / "runs"), "data": {"dir": str(tmp / "data"), "batch_size": 20},
           "model": {"family": "mlp", "config": {"widths": [8]}}, "optim": {"name": "adamw", "lr": 0.01},
           "train": {"epochs": 2, "progress": False}, "checkpoint": {"every_steps": 3},
           "registry": {"name": "perm", "alias": "production", "root": str(tmp / "reg")}}
    s = run(cfg)
    assert s["state"] == "completed", s
    os.environ["HPC_REGISTRY"] = str(tmp / "reg")
    sys.exit(main(["infer", "--model", "perm@production", "--input", str(tmp / "data" / "test"),
                   "--output", str(tmp / "out"), "--format", "csv"]))
""")


@pytest.mark.parametrize("umask", ["022", "027"])
def test_every_artifact_is_group_readable_under_the_umask(tmp_path, umask):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HPC_PROGRESS_S": "0"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, umask, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    kinds = {"data": 0, "runs": 0, "checkpoints": 0, "models": 0, "reg": 0, "out": 0}
    private = []
    for root, dirs, files in os.walk(tmp_path):
        for name in dirs + files:
            p = Path(root, name)
            mode = p.lstat().st_mode
            need = stat.S_IRGRP | (stat.S_IXGRP if stat.S_ISDIR(mode) else 0)
            if mode & need != need:
                private.append(f"{oct(stat.S_IMODE(mode))} {p.relative_to(tmp_path)}")
            if stat.S_ISREG(mode):
                rel = p.relative_to(tmp_path).parts
                for k in kinds:
                    if k in rel:
                        kinds[k] += 1
            # umask 027: nothing is world-readable either (the umask is respected, not overridden)
            if umask == "027" and mode & stat.S_IROTH:
                private.append(f"world-readable under 027: {oct(stat.S_IMODE(mode))} {p.relative_to(tmp_path)}")
    assert not private, "\n".join(private)
    assert all(kinds.values()), kinds  # every artifact kind was written and checked
    ckpt_files = list(tmp_path.glob("runs/perm/*/checkpoints/step-*/*.safetensors"))
    models = list(tmp_path.glob("runs/perm/*/models/*.safetensors"))
    assert ckpt_files and {m.name for m in models} >= {"best.safetensors", "last.safetensors"}
    assert list(tmp_path.glob("reg/perm/*/model.safetensors"))
