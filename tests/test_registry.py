"""The model registry: atomic versions under concurrency, checksums, aliases, no pickle, ensembles."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpc.cli import main
from hpc.models import build_model
from hpc.registry import IntegrityError, Registry
from hpc.registry.scorers import Ensemble

SCHEMA = {"task": "classification", "num_classes": 3,
          "fields": {"x": {"dtype": "float32", "shape": [6]}, "y": {"dtype": "int64", "shape": []}}}


def make_run_dir(path: Path, schema: dict = SCHEMA, stats: dict | None = None, seed: int = 0,
                 family: str = "mlp", config: dict | None = None, acc: float = 0.5,
                 normalize: bool = True) -> Path:
    """A run directory as `hpc train` writes it (docs/DESIGN.md "Run directory"), built by hand."""
    config = {"widths": [8]} if config is None and family == "mlp" else (config or {})
    torch.manual_seed(seed)
    model = build_model(family, config, schema)
    (path / "models").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "models" / "best.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(path / "models" / "last.safetensors"))
    if stats is None:
        d = schema["fields"]["x"]["shape"][0]
        stats = {"x": {"mean": [0.1 * i for i in range(d)], "std": [1.0 + 0.5 * i for i in range(d)],
                       "count": 100, "per": "feature"}}
    (path / "config.yaml").write_text(f"model:\n  family: {family}\nseed: {seed}\n"
                                      f"data:\n  normalize: {str(normalize).lower()}\n")
    summary = {
        "model": {"family": family, "config": config},
        "data": {"dir": str(path / "data"), "manifest_sha256": "ab" * 32, "schema": schema, "stats": stats},
        "metrics": {"val": {"accuracy": acc}, "test": {"accuracy": acc - 0.01}},
        "world_size": 2, "backend": "mpi", "samples_per_s": 1000.0, "wall_s": 3.0,
        "versions": {"torch": torch.__version__}, "code_version": "abc123",
        "slurm": {"job_id": None, "restart_count": 0}, "state": "done",
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def run_dir(tmp_path):
    return make_run_dir(tmp_path / "run")


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "reg")


def test_add_writes_complete_verified_version(reg, run_dir):
    assert reg.add(run_dir, "clf") == 1
    assert reg.add(run_dir, "clf", source="last") == 2
    vdir = reg.root / "clf" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["SHA256SUMS", "model.json", "model.safetensors"]
    sums = (vdir / "SHA256SUMS").read_text().split("\n")
    assert {line.split()[1] for line in sums if line} == {"model.json", "model.safetensors"}
    card = reg.card("clf@1")
    assert card["model"]["family"] == "mlp" and card["schema"] == SCHEMA
    assert card["lineage"]["run_dir"] == str(run_dir.resolve()) and card["lineage"]["source"] == "best"
    assert card["data"]["manifest_sha256"] == "ab" * 32 and card["training_config"]["seed"] == 0
    assert card["registered"]["versions"]["torch"] == torch.__version__
    assert card["metrics"]["val"]["accuracy"] == 0.5
    model, card = reg.load("clf@1", allow_unpromoted=True)
    ref = build_model("mlp", {"widths": [8]}, SCHEMA)
    ref.load_state_dict(load_file(str(run_dir / "models" / "best.safetensors")))
    x = {"x": torch.randn(5, 6)}
    assert torch.equal(model(x), ref.eval()(x))
    m2, _ = reg.load("clf@2", allow_unpromoted=True)
    assert not torch.equal(m2(x), model(x))  # --from last is a different set of weights
    assert reg.resolve("clf").version == 2  # a bare name is the latest version


_ADD_WHEN_GATE = """
import sys, time, os
from pathlib import Path
from hpc.registry import Registry
gate = Path(sys.argv[3])
while not gate.exists():
    time.sleep(0.001)
print(Registry(sys.argv[1]).add(sys.argv[2], "clf"))
"""


def test_concurrent_registrations_get_distinct_complete_versions(reg, run_dir, tmp_path):
    gate = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _ADD_WHEN_GATE, str(reg.root), str(run_dir), str(gate)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(3.0)  # let all three import torch and wait at the gate, then release them together
    gate.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    versions = sorted(int(o.strip()) for o, _ in outs)
    assert versions == [1, 2, 3]
    for v in versions:
        reg.verify(f"clf@{v}")
    assert [p.name for p in (reg.root / "clf").iterdir() if p.name.startswith(".")] == []


def test_version_collision_retries_with_next_number(reg, run_dir, monkeypatch):
    assert reg.add(run_dir, "clf") == 1
    crashed = [reg.root / "clf" / ".staged-1-1", reg.root / "clf" / "..staged-2-2.abc.tmp"]
    for d in crashed:  # left by registrations that crashed a day ago
        d.mkdir()
        os.utime(d, (time.time() - 2 * 86400,) * 2)
    fresh = reg.root / "clf" / ".staged-3-3"
    fresh.mkdir()  # a registration in progress right now: left alone
    # Simulate the race deterministically: this writer believes no version exists yet.
    monkeypatch.setattr(Registry, "versions", lambda self, name: [])
    assert reg.add(run_dir, "clf") == 2
    monkeypatch.undo()
    assert reg.versions("clf") == [1, 2]
    assert not any(d.exists() for d in crashed) and fresh.exists()
    reg.verify("clf@2")


def test_tampered_weights_refused_naming_the_file(reg, run_dir, capsys):
    reg.add(run_dir, "clf")
    reg.promote("clf", 1, "production")
    w = reg.root / "clf" / "1" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: changed"):
        reg.load("clf@production")
    assert main(["registry", "verify", "clf@1", "--registry", str(reg.root)]) == 1
    assert "FAILED" in capsys.readouterr().out and "model.safetensors: changed" in str(
        pytest.raises(IntegrityError, reg.verify, "clf@1").value)


def test_verify_names_missing_extra_and_symlinked_files(reg, run_dir):
    reg.add(run_dir, "clf")
    vdir = reg.root / "clf" / "1"
    (vdir / "model.json").unlink()
    (vdir / "notes.txt").write_text("hi")
    (vdir / "link").symlink_to(vdir / "SHA256SUMS")
    msg = str(pytest.raises(IntegrityError, reg.verify, "clf@1").value)
    assert "model.json: missing" in msg and "notes.txt: extra file" in msg and "link: is a symlink" in msg


class _Boom:
    """Unpickling this runs code: it creates the marker file. The registry must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_planted_pickle_is_never_loaded(reg, run_dir, tmp_path):
    reg.add(run_dir, "clf")
    reg.promote("clf", 1, "production")
    vdir = reg.root / "clf" / "1"
    marker = tmp_path / "pwned"
    (vdir / "model.pt").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(IntegrityError, match=r"model\.pt: extra file"):
        reg.load("clf@production")
    # Even a pickle swapped in as the weights *with* rewritten checksums is not unpickled:
    # safetensors parsing refuses it.
    from hpc.registry.layout import format_sums
    from hpc.util.io import sha256_file

    (vdir / "model.pt").unlink()
    (vdir / "model.safetensors").write_bytes(pickle.dumps(_Boom(str(marker))))
    (vdir / "SHA256SUMS").write_text(format_sums({f: sha256_file(vdir / f) for f in
                                                  ("model.json", "model.safetensors")}))
    with pytest.raises(Exception):
        reg.load("clf@production")
    assert not marker.exists()


def test_promote_moves_alias_atomically_and_logs(reg, run_dir, tmp_path):
    for _ in range(3):
        reg.add(run_dir, "clf")
    assert reg.promote("clf", 1, "production") is None
    assert reg.promote("clf", 2, "production") == 1
    reg.promote("clf", "production", "staging")
    assert reg.aliases("clf") == {"production": 2, "staging": 2}
    assert reg.resolve("clf@production").version == 2
    log = reg.alias_log("clf")
    assert [(e["alias"], e["version"], e["previous"]) for e in log] == [
        ("production", 1, None), ("production", 2, 1), ("staging", 2, None)]
    with pytest.raises(ValueError, match="no alias points to.*--allow-unpromoted"):
        reg.load("clf@3")
    reg.load("clf@3", allow_unpromoted=True)
    reg.load("clf@2")  # promoted: accepted by version number too
    with pytest.raises(ValueError, match="no such alias.*production->2"):
        reg.resolve("clf@prod")
    with pytest.raises(ValueError, match="must match"):
        reg.promote("clf", 1, "42")
    with pytest.raises(ValueError, match="no such version"):
        reg.promote("clf", 9, "production")


def test_add_rejects_bad_run_dirs(reg, tmp_path, run_dir):
    with pytest.raises(ValueError, match="run directory not found"):
        reg.add(tmp_path / "nope", "clf")
    (run_dir / "models" / "best.safetensors").unlink()
    with pytest.raises(ValueError, match=r"best\.safetensors: not found.*last\.safetensors"):
        reg.add(run_dir, "clf")
    (run_dir / "models" / "last.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        reg.add(run_dir, "clf", source="last")
    with pytest.raises(ValueError, match="model name"):
        reg.add(run_dir, "../evil")
    assert not (reg.root / "clf").exists() or reg.versions("clf") == []


def test_ensemble_lineage_and_cli(reg, tmp_path, capsys):
    a = make_run_dir(tmp_path / "a", seed=1, acc=0.6)
    b = make_run_dir(tmp_path / "b", seed=2, acc=0.7)
    reg.add(a, "a")
    reg.add(b, "b")
    reg.promote("a", 1, "production")
    r = str(reg.root)
    assert main(["registry", "add", "--name", "ens", "--ensemble", "a@production,b@1",
                 "--combine", "vote", "--registry", r]) == 0
    assert main(["registry", "show", "ens@1", "--registry", r]) == 0
    out = capsys.readouterr().out
    a1, b1 = "a@1 (mlp) val.accuracy=0.6 test.accuracy=0.59", "b@1 (mlp) val.accuracy=0.7 test.accuracy=0.69"
    assert f"    vote of 2\n      {a1}\n      {b1}\n" in out
    # an ensemble of an ensemble: `show` prints the tree, the inner ensemble expanded
    assert main(["registry", "add", "--name", "ens2", "--ensemble", "ens@1,a@1", "--registry", r]) == 0
    assert main(["registry", "show", "ens2@1", "--registry", r]) == 0
    out = capsys.readouterr().out
    assert (f"    mean of 2\n      ens@1 (ensemble)\n        vote of 2\n          {a1}\n          {b1}\n"
            f"      {a1}\n") in out
    assert main(["registry", "show", "a@production", "--registry", r]) == 0
    out = capsys.readouterr().out
    assert str(a.resolve()) in out and "ab" * 32 in out  # lineage: run directory, data manifest
    assert main(["registry", "diff", "a@1", "b@1", "--registry", r]) == 0
    out = capsys.readouterr().out
    assert "metrics.val.accuracy" in out and "0.6" in out and "0.7" in out and "lineage.run_dir" in out
    assert main(["registry", "list", "--registry", r]) == 0
    assert "production" in capsys.readouterr().out
    model, card = reg.load("ens@1", allow_unpromoted=True)
    assert isinstance(model, Ensemble) and [c["name"] for c in model.cards] == ["a", "b"]
    probs = model(model.prepare({"x": torch.randn(4, 6)}))
    assert probs.shape == (4, 3) and set(probs.sum(1).tolist()) == {1.0}
    # A member tampered after the ensemble was registered: the ensemble refuses to load.
    w = reg.root / "b" / "1" / "model.json"
    w.write_text(w.read_text().replace('"mlp"', '"mlp" '))
    with pytest.raises(IntegrityError, match=r"b@1 failed verification.*model\.json: changed"):
        reg.load("ens@1", allow_unpromoted=True)
    assert main(["registry", "promote", "a", "7", "--alias", "production", "--registry", r]) == 2
    assert "no such version" in capsys.readouterr().err


def test_stacking_ensemble_meta_model_is_a_verified_artifact(reg, tmp_path):
    from hpc.models.combine import MetaModel

    for n, seed in (("a", 1), ("b", 2)):
        reg.add(make_run_dir(tmp_path / n, seed=seed), n)
    torch.manual_seed(0)
    meta = MetaModel("softmax", 2 * 3, 3)
    v = reg.add_ensemble("st", ["a@1", "b@1"], "stacking", groups=[[0], [1]], meta=meta)
    assert (reg.root / "st" / str(v) / "meta.safetensors").is_file()
    model, card = reg.load(f"st@{v}", allow_unpromoted=True)
    x = {"x": torch.randn(4, 6)}
    probs = model(model.prepare(x))
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(1), torch.ones(4))
    w = reg.root / "st" / str(v) / "meta.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=r"meta\.safetensors: changed"):
        reg.load(f"st@{v}", allow_unpromoted=True)


def test_normalization_recorded_as_trained(reg, tmp_path):
    from hpc.registry.scorers import Single

    stats = {"x": {"mean": [1.0] * 6, "std": [2.0] * 6, "count": 9, "per": "feature"},
             "y": {"mean": [1.0], "std": [0.5], "count": 9, "per": "feature"}}
    reg.add(make_run_dir(tmp_path / "on", stats=stats), "on")
    reg.add(make_run_dir(tmp_path / "off", stats=stats, normalize=False), "off")
    on, off = reg.card("on@1"), reg.card("off@1")
    assert on["normalization"] == {"enabled": True, "stats": {"x": stats["x"]}}  # inputs only, as the reader
    assert off["normalization"] == {"enabled": False, "stats": {}}
    x = {"x": torch.full((2, 6), 5.0), "y": torch.zeros(2, dtype=torch.int64)}
    model, card = reg.load("on@1", allow_unpromoted=True)
    assert torch.equal(Single(model, card).prepare(x)["x"], torch.full((2, 6), 2.0))
    model, card = reg.load("off@1", allow_unpromoted=True)
    assert torch.equal(Single(model, card).prepare(x)["x"], x["x"])


def test_registry_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HPC_REGISTRY", str(tmp_path / "envreg"))
    assert Registry().root == tmp_path / "envreg"
    assert Registry(tmp_path / "x").root == tmp_path / "x"
    monkeypatch.delenv("HPC_REGISTRY")
    assert Registry().root == Path("registry")
