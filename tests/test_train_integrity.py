"""Checkpoint integrity (every file, meta.json included), optimizer hyper-parameters from the config,
partial checkpoints of crashed writers removed, non-finite models never registered, unfinished runs
not registered by accident (issue 17)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hpc.dist.comm import LocalComm
from hpc.train.checkpoint import SUMS, Checkpoints

REPO = Path(__file__).resolve().parents[1]


def _flip_momentum(meta: Path) -> None:
    """0.9 -> 0.1 in the optimizer's param group: one bit of one byte ('9' 0x39 -> '1' 0x31)."""
    text = meta.read_text()
    new, n = re.subn(r'("momentum",\s*)0\.9', r"\g<1>0.1", text)
    assert n == 1, text
    meta.write_text(new)


def _save(ck, step, model, opt):
    ck.save(step, model, opt, {"step": step}, {"reader": {"batch": step}})


def _two_checkpoints(tmp_path, momentum=0.9):
    ck = Checkpoints(tmp_path / "ck", LocalComm(), keep=3)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for step in (1, 2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        _save(ck, step, model, opt)
    return ck, model, opt


def test_a_flipped_bit_in_meta_json_is_refused_naming_the_file(tmp_path, caplog):
    ck, model, opt = _two_checkpoints(tmp_path)
    meta = tmp_path / "ck" / "step-000000002" / "meta.json"
    _flip_momentum(meta)
    with caplog.at_level(logging.WARNING, logger="hpc.train"):
        path = ck.choose()
    assert path.name == "step-000000001"  # the previous complete checkpoint, said in the log
    assert "step-000000002 cannot be used" in caplog.text and "meta.json: checksum mismatch" in caplog.text
    # An explicit checkpoint that is damaged is refused outright.
    from hpc.train.config import AllRanksError
    with pytest.raises(AllRanksError, match="is damaged"):
        ck.choose(meta.parent)


def test_an_unlisted_or_missing_file_is_refused(tmp_path, caplog):
    ck, _, _ = _two_checkpoints(tmp_path)
    (tmp_path / "ck" / "step-000000002" / "extra.json").write_text("{}")
    (tmp_path / "ck" / "step-000000001" / "rank-00000.json").unlink()
    with caplog.at_level(logging.ERROR, logger="hpc.train"):
        assert ck.choose() is None
    assert "extra.json: not in SHA256SUMS" in caplog.text and "rank-00000.json: missing" in caplog.text


def test_an_old_checkpoint_without_sha256sums_loads_with_a_warning(tmp_path, caplog):
    ck, model, opt = _two_checkpoints(tmp_path)
    (tmp_path / "ck" / "step-000000002" / SUMS).unlink()
    with caplog.at_level(logging.WARNING, logger="hpc.train"):
        path = ck.choose()
    assert path.name == "step-000000002"
    assert f"has no {SUMS}" in caplog.text and "meta.json itself is not verified" in caplog.text


def test_optimizer_hyperparameters_come_from_the_config_not_the_checkpoint(tmp_path, caplog):
    ck, model, opt = _two_checkpoints(tmp_path, momentum=0.9)
    # A checkpoint whose meta.json says momentum 0.1 and whose record was rewritten to match (a
    # damaged or edited checkpoint that verifies): the config (0.9 here) still wins.
    d = tmp_path / "ck" / "step-000000002"
    meta = d / "meta.json"
    _flip_momentum(meta)
    from hpc.train.checkpoint import write_sums
    write_sums(d)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="hpc.train"):
        ck.load(ck.choose(), model2, opt2)
    assert opt2.param_groups[0]["momentum"] == 0.9
    assert "momentum=0.1 differs from the config's 0.9; using the config's" in caplog.text
    # The state itself (the momentum buffers) is the checkpoint's.
    torch.testing.assert_close(opt2.state[model2.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])
    # Adam's betas (a tuple, a list after JSON) are not reported as a difference.
    caplog.clear()
    m = torch.nn.Linear(3, 2)
    a = torch.optim.Adam(m.parameters(), betas=(0.8, 0.9))
    m(torch.randn(2, 3)).sum().backward()
    a.step()
    _save(ck, 3, m, a)
    a2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), betas=(0.8, 0.9))
    with caplog.at_level(logging.WARNING, logger="hpc.train"):
        ck.load(ck.choose(), torch.nn.Linear(3, 2), a2)
    assert "differs" not in caplog.text and a2.param_groups[0]["betas"] == (0.8, 0.9)


# A writer SIGKILLed in the middle of a checkpoint (after its rank file, before the model file).
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    import hpc.train.checkpoint as c
    from hpc.dist.comm import LocalComm
    ck = c.Checkpoints(sys.argv[1], LocalComm(), keep=3)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck.save(1, model, opt, {"step": 1}, {})
    real = c.save_file
    def dying(tensors, path, *a, **k):
        if path.endswith("model.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, path, *a, **k)
    c.save_file = dying
    ck.save(int(sys.argv[2]), model, opt, {"step": 2}, {})
""")


def test_partial_checkpoints_of_killed_writers_are_removed_but_not_a_live_writers(tmp_path, caplog):
    ckdir = tmp_path / "ck"
    for step in (2, 3):  # two SIGKILLs, each leaving a partial .step-*.tmp directory
        r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(ckdir), str(step)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == -9, r.stderr
    partial = sorted(p.name for p in ckdir.iterdir() if p.name.endswith(".tmp"))
    assert len(partial) == 2 and partial[0].startswith(".step-000000002.")
    # Another live process writing step 4 in the same directory holds its temporary directory's lock.
    live = ckdir / ".step-000000004.live.tmp"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        ck = Checkpoints(ckdir, LocalComm(), keep=3)
        with caplog.at_level(logging.INFO, logger="hpc.train"):
            assert ck.choose().name == "step-000000001"
        left = sorted(p.name for p in ckdir.iterdir())
        assert left == [".step-000000004.live.tmp", "latest", "step-000000001"], left
        assert "removed 2 partial checkpoint(s)" in caplog.text and "live process: left alone" in caplog.text
    finally:
        os.close(fd)


# -- the run's end: non-finite evaluation, unfinished runs ------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from hpc.data import SynthConfig, synth

    d = tmp_path_factory.mktemp("data") / "d"
    synth(SynthConfig(kind="tabular", samples=200, features=6, classes=3, seed=1), d,
          split="train=0.8,val=0.1,test=0.1")
    return d


def _cfg(tmp_path, data_dir):
    return {"name": "nf", "out_dir": str(tmp_path / "runs"), "data": {"dir": str(data_dir), "batch_size": 20},
            "model": {"family": "mlp", "config": {"widths": [8]}}, "optim": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 1, "progress": False},
            "registry": {"name": "nf", "alias": "production", "root": str(tmp_path / "reg")}}


def test_a_non_finite_evaluation_fails_the_run_and_registers_nothing(tmp_path, data_dir):
    from hpc.train import run

    s = run(_cfg(tmp_path, data_dir), ["optim.lr=1.0e+38", "train.max_steps=1"])
    assert s["state"] == "failed" and "registry" not in s
    assert "non-finite evaluation" in s["reason"] and "val loss = nan" in s["reason"], s["reason"]
    assert not (tmp_path / "reg" / "nf").exists()
    assert json.loads(Path(s["run_dir"], "summary.json").read_text())["state"] == "failed"
    from hpc.cli.train import EXIT
    assert EXIT[s["state"]] == 1  # `hpc train` exits non-zero


def test_a_nan_validation_is_never_the_best():
    from hpc.train.state import TrainState

    s = TrainState()
    assert not s.record_eval(float("nan"), {"loss": float("nan")}, higher_is_better=False)
    assert s.best["step"] is None and s.last_val["loss"] != s.last_val["loss"]
    s.step = 1
    assert s.record_eval(0.5, {"loss": 0.5}, higher_is_better=False) and s.best["step"] == 1


def test_registering_an_unfinished_run_is_refused_unless_allowed(tmp_path, data_dir):
    from hpc.train import run

    cfg = _cfg(tmp_path, data_dir)
    cfg["registry"] = None
    s = run(cfg)
    run_dir = Path(s["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "state": "preempted"}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "hpc", "registry", "add", str(run_dir), "--name", "u",
            "--registry", str(tmp_path / "reg")]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "the run is preempted" in r.stderr and "--allow-unfinished" in r.stderr, r.stderr
    assert not (tmp_path / "reg" / "u").exists()
    r = subprocess.run(base + ["--allow-unfinished"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "WARNING" in r.stderr and "preempted" in r.stderr, r.stderr
    assert "registered u@1" in r.stdout


# -- the verified-hash cache across runs (issue 20) --------------------------------------------------

def test_a_restarted_run_skips_the_shard_hash_and_still_catches_a_changed_byte(tmp_path, monkeypatch):
    import h5py

    import hpc.data.integrity as integrity
    from _data_util import record_verifiers
    from hpc.data import SynthConfig, WriterConfig, synth
    from hpc.data.integrity import ShardIntegrityError
    from hpc.train import run

    synth(SynthConfig(kind="tabular", samples=300, features=6, classes=3, seed=3), tmp_path / "d",
          split="train=0.8,val=0.2", writer=WriterConfig(samples_per_shard=60))
    monkeypatch.setenv("HPC_VERIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(integrity, "RACY_S", 0.0)  # the shards were written a moment ago
    made = record_verifiers(monkeypatch)
    cfg = {"name": "hc", "out_dir": str(tmp_path / "runs"), "data": {"dir": str(tmp_path / "d"), "batch_size": 20},
           "model": {"family": "mlp", "config": {"widths": [8]}}, "train": {"epochs": 1, "progress": False}}

    def train_shards(run_id):
        made.clear()
        s = run({**cfg, "run_id": run_id})
        assert s["state"] == "completed"
        train = [v for v in made if len(v.m.shards) == 4]  # the training split's verifier (val has 1 shard)
        return sorted(x for v in train for x in v.hashed), sorted(x for v in train for x in v.from_cache)

    assert train_shards("first") == ([0, 1, 2, 3], [])
    assert train_shards("restart") == ([], [0, 1, 2, 3])  # nothing re-hashed
    p = tmp_path / "d" / "train" / "shard-00001.h5"
    with h5py.File(p, "r") as f:
        off = f["/x"].id.get_offset() if f["/x"].chunks is None else f["/x"].id.get_chunk_info(0).byte_offset
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.seek(off + 11)
        b = f.read(1)
        f.seek(off + 11)
        f.write(bytes([b[0] ^ 0x20]))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime moved anyway
    with pytest.raises(ShardIntegrityError, match=r"shard-00001\.h5: sha256 .* does not match"):
        run({**cfg, "run_id": "after-the-flip"})
