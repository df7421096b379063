"""Progress reporting (hpc.util.progress) and where it shows: training, hpc data, hpc infer.

The formatting is pure and the reporter's clock injectable, so those tests do not sleep. The rest
runs the real commands with stderr a pipe (as under mpiexec, srun or a Slurm output file), where a
tqdm bar never draws, and reads the plain lines.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import mpi_env
from hpc.util.progress import (Progress, eta_s, format_duration, format_line, format_value,
                               progress_interval_s)

NUM = r"[\d,.]+"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# -- pure -----------------------------------------------------------------------------------------
def test_format_duration_eta_and_values():
    assert [format_duration(s) for s in (None, float("nan"), -1, 4.24, 42, 185, 7620)] == \
        ["?", "?", "?", "4.2s", "42s", "3m05s", "2h07m"]
    assert eta_s(50, 200, 5.0) == 30.0
    assert eta_s(200, 200, None) == 0.0 and eta_s(250, 200, 1.0) == 0.0  # done: nothing left
    assert eta_s(50, None, 5.0) is None and eta_s(50, 200, 0.0) is None and eta_s(50, 200, None) is None
    assert [format_value(v) for v in (12345, 12345.6, 2.5, 0.123456, "0.4321")] == \
        ["12,345", "12,346", "2.5", "0.1235", "0.4321"]


def test_format_line_training_data_unknown_total_and_closing():
    fields = {"epoch": 1, "loss": "0.4321", "samples/s": 12345.6}
    assert (format_line(120, 300, noun="step", unit="steps", rate=2.5, fields=fields, label="train")
            == "train: step 120/300 (40%) epoch 1 loss 0.4321 samples/s 12,346 | 2.5 steps/s, ETA 1m12s")
    assert (format_line(12288, 100000, rate=4096.0, label="synth")
            == "synth: rows 12,288/100,000 (12%) | 4,096 rows/s, ETA 21s")
    assert format_line(5000, None, rate=1000.0, label="shard") == "shard: rows 5,000 | 1,000 rows/s, ETA ?"
    assert format_line(0, 100, rate=None) == "rows 0/100 (0%) | ? rows/s, ETA ?"
    assert (format_line(300, 300, noun="step", unit="steps", rate=2.4, label="train", elapsed_s=125)
            == "train: step 300/300 (100%) | 2.4 steps/s, 2m05s elapsed")


@pytest.mark.parametrize("raw, want", [(None, 10.0), ("", 10.0), ("0.5", 0.5), ("0", 0.0), (" 30 ", 30.0)])
def test_interval_from_env(raw, want):
    assert progress_interval_s({} if raw is None else {"HPC_PROGRESS_S": raw}) == want


@pytest.mark.parametrize("raw", ["-1", "abc", "inf", "nan"])
def test_bad_interval_names_the_variable(raw):
    with pytest.raises(ValueError, match=r"HPC_PROGRESS_S=.*>= 0"):
        progress_interval_s({"HPC_PROGRESS_S": raw})


def test_plain_lines_every_interval_with_the_recent_rate_then_a_closing_line():
    clock, out = Clock(), io.StringIO()
    p = Progress(100, label="x", interval_s=10, stream=out, clock=clock)
    for t, done in ((5, 10), (10, 20), (12, 30), (20, 60)):
        clock.t = t
        p.set(done)
    p.set_fields(loss="0.5")
    clock.t = 25
    p.close()
    p.update(5)  # after close: nothing
    assert out.getvalue().splitlines() == [
        "x: rows 20/100 (20%) | 2 rows/s, ETA 40s",            # 20 rows in the first 10 s
        "x: rows 60/100 (60%) | 4 rows/s, ETA 10s",            # the last 10 s ran at 4 rows/s
        "x: rows 60/100 (60%) loss 0.5 | 2.4 rows/s, 25s elapsed",  # closing: the average
    ]


def test_disabled_exception_and_terminal():
    out = io.StringIO()
    p = Progress(10, enabled=False, stream=out, interval_s=0)
    p.update(3, loss=1.0)
    p.close()
    assert out.getvalue() == ""
    with pytest.raises(RuntimeError):
        with Progress(10, stream=out, interval_s=1e9) as p:
            p.update(3)
            raise RuntimeError("x")
    assert out.getvalue() == ""  # no closing line that would claim the work ended
    bar = Progress(10, stream=out, interval_s=0, tty=True)  # a terminal: tqdm, no plain lines
    bar.update(4, loss="0.25")
    bar.close()
    assert "| ? rows/s" not in out.getvalue() and "ETA" not in out.getvalue()


# -- training under mpiexec ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from hpc.data import SynthConfig, synth

    root = tmp_path_factory.mktemp("progress")
    synth(SynthConfig(kind="tabular", samples=600, features=8, classes=3, seed=3), root / "data",
          split="train=0.8,val=0.1,test=0.1")
    cfg = {"name": "p", "out_dir": str(root / "runs"), "seed": 1,
           "data": {"dir": str(root / "data"), "batch_size": 16},
           "model": {"family": "mlp", "config": {"widths": [16]}}, "optim": {"name": "adam", "lr": 0.01},
           "train": {"epochs": 100, "max_steps": 300, "log_every": 2}, "dist": {"timeout_s": 60}}
    (root / "p.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.mpi
def test_two_rank_training_piped_shows_run_line_then_periodic_progress(ws):
    r = subprocess.run([sys.executable, "-m", "hpc", "train", str(ws / "p.yaml"), "run_id=two", "--nproc", "2"],
                       capture_output=True, text=True, timeout=240, cwd=ws,
                       env=mpi_env({"HPC_PROGRESS_S": "0.02"}))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    run_dir = ws / "runs" / "p" / "two"
    start = [i for i, x in enumerate(lines)
             if f"rank 0 INFO run {run_dir}: 2 rank(s), backend mpi, device cpu; 300 steps (30 per epoch)" in x]
    prog = [i for i, x in enumerate(lines) if " INFO train: step " in x]
    assert start and prog and start[0] < prog[0], r.stderr[-3000:]
    assert all(" rank 0 " in lines[i] for i in prog)  # rank 0 only
    periodic = [m for i in prog if (m := re.search(
        rf"train: step (\d+)/300 \((\d+)%\) epoch (\d+) loss ({NUM}) samples/s ({NUM}) \| ({NUM}) steps/s, "
        rf"ETA (\S+)$", lines[i]))]
    assert len(periodic) >= 2, r.stderr[-3000:]
    steps = [int(m[1]) for m in periodic]
    assert steps == sorted(steps) and steps[0] < 300
    assert any(m[7] != "?" for m in periodic) and all(float(m[5].replace(",", "")) > 0 for m in periodic)
    assert re.search(r"train: step 300/300 \(100%\) epoch \d+ loss .* steps/s, \S+ elapsed$", lines[prog[-1]])
    # One samples/s: metrics.jsonl's last train line (at the last step, nothing after it) and
    # summary.json both count step time only (not eval, checkpoints or start-up).
    summary = json.loads((run_dir / "summary.json").read_text())
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"][-1]
    assert last["step"] == 300 and last["samples_per_s"] == pytest.approx(summary["samples_per_s"], rel=1e-9)
    assert re.search(rf"samples/s {summary['samples_per_s']:,.0f} ", lines[prog[-1]])


def test_progress_false_keeps_the_run_line_and_drops_progress_lines(ws, capsys, monkeypatch):
    from hpc.cli import main

    monkeypatch.setenv("HPC_PROGRESS_S", "0")
    assert main(["train", str(ws / "p.yaml"), "run_id=quiet", "train.max_steps=20", "train.progress=false"]) == 0
    err = capsys.readouterr().err
    assert "backend local, device cpu; 20 steps (30 per epoch)" in err and "train: step" not in err
    monkeypatch.setenv("HPC_PROGRESS_S", "soon")
    assert main(["train", str(ws / "p.yaml"), "run_id=bad", "train.max_steps=2"]) == 2
    assert "HPC_PROGRESS_S='soon'" in capsys.readouterr().err


# -- hpc data and hpc infer ------------------------------------------------------------------------
def _hpc(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True, timeout=240,
                       cwd=cwd, env=mpi_env({"HPC_PROGRESS_S": "0", **(env or {})}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rows/s" not in r.stdout  # progress goes to stderr; stdout keeps the summaries
    return r


def _rows(stderr: str, label: str) -> list[tuple[int, int | None, str]]:
    """(done, total, tail) of every ``label:`` progress line."""
    out = []
    for m in re.finditer(rf"^{label}: rows ([\d,]+)(?:/([\d,]+) \(\d+%\))? \| {NUM} rows/s, (.*)$", stderr, re.M):
        out.append((int(m[1].replace(",", "")), int(m[2].replace(",", "")) if m[2] else None, m[3]))
    return out


def test_data_commands_piped_show_rows_done_of_total(tmp_path):
    r = _hpc("data", "synth", "--kind", "tabular", "--samples", "10000", "--features", "4", "--out", "d",
             cwd=tmp_path)
    got = _rows(r.stderr, "synth")
    assert [(d, t) for d, t, _ in got] == [(4096, 10000), (8192, 10000), (10000, 10000), (10000, 10000)]
    assert got[0][2].startswith("ETA ") and got[-1][2].endswith(" elapsed")

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(1000, 3)), y=rng.integers(0, 2, 1000))
    r = _hpc("data", "shard", "--from", "a.npz", "--out", "s", cwd=tmp_path)
    assert [(d, t) for d, t, _ in _rows(r.stderr, "shard")] == [(1000, 1000), (1000, 1000)]
    (tmp_path / "a.csv").write_text("f,label\n" + "".join(f"{i / 10},{i % 2}\n" for i in range(50)))
    r = _hpc("data", "shard", "--from", "a.csv", "--out", "c", cwd=tmp_path)
    assert [(d, t) for d, t, _ in _rows(r.stderr, "shard")] == [(50, None), (50, None)]  # CSV: total unknown

    r = _hpc("data", "verify", "d", cwd=tmp_path)
    got = _rows(r.stderr, "verify")
    assert [t for _, t, _ in got] == [10000] * 4 and got[-1][0] == 10000 and got[0][0] < 10000

    (tmp_path / "ix").mkdir()
    r = _hpc("data", "index", "ix", "--x", "/x", "--y", "/y", "--files", str(tmp_path / "d/train/shard-00000.h5"),
             cwd=tmp_path)
    assert [(d, t) for d, t, _ in _rows(r.stderr, "index")] == [(8000, 8000), (8000, 8000)]


@pytest.mark.mpi
def test_infer_two_ranks_piped_rank0_reports_its_own_rows(tmp_path):
    from hpc.data.partition import assign_shards
    from hpc.data.synth import SynthConfig, synth
    from hpc.data.writer import WriterConfig
    from hpc.registry import Registry
    from test_registry import make_run_dir

    ms = synth(SynthConfig(kind="tabular", samples=700, features=6, classes=3, seed=3), tmp_path / "data",
               split="all=1", writer=WriterConfig(samples_per_shard=100))
    reg = Registry(tmp_path / "reg")
    reg.add(make_run_dir(tmp_path / "run", schema=ms["all"].schema(), stats=ms["all"].stats), "clf")
    reg.promote("clf", 1, "production")
    r = _hpc("infer", "--model", "clf@production", "--input", str(tmp_path / "data" / "all"), "--output", "out",
             "--registry", str(reg.root), "--batch-size", "25", "--nproc", "2", cwd=tmp_path)
    counts = ms["all"].sample_counts
    mine = sum(counts[s] for s in assign_shards(counts, 2)[0])
    got = _rows(r.stderr, "infer rank 0 of 2")
    assert [t for _, t, _ in got] == [mine] * len(got) and len(got) == mine // 25 + 1, r.stderr[-3000:]
    assert [d for d, _, _ in got[:-1]] == list(range(25, mine + 1, 25))
    assert sum(x.endswith(" elapsed") for _, _, x in got) == 1  # one closing line: rank 0 only
