"""The layering of docs/DESIGN.md is checked, not hoped for: `lint-imports` (import-linter, contracts
in pyproject.toml) passes on the tree, and fails on a copy of it with one upward import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    if not Path(LINT).exists():
        pytest.fail("lint-imports is missing: pip install -e .[test] (import-linter)")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def _copy_tree(dst: Path) -> Path:
    shutil.copytree(REPO / "hpc", dst / "hpc", ignore=shutil.ignore_patterns("__pycache__", "*.cu", "*.cuh"))
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_every_contract(tmp_path):
    r = _lint(_copy_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module,upward", [
    ("hpc/util/io.py", "hpc.cli"),                 # the bottom layer reaching the top
    ("hpc/train/trainer.py", "hpc.launch.requeue"),  # the trainer deciding to requeue
    ("hpc/registry/card.py", "hpc.ensemble.driver"),
    ("hpc/models/mlp.py", "hpc.dist.world"),       # model code never imports distributed code
    ("hpc/infer/job.py", "hpc.kernels"),           # kernels only through hpc.models.ops
])
def test_an_added_upward_import_breaks_the_build(tmp_path, module, upward):
    root = _copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\nimport {upward}  # added by the test\n")
    r = _lint(root)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout and module.replace("/", ".").removesuffix(".py") in r.stdout, r.stdout
