"""`hpc report`: goodput math, rendering of simulated, sweep, inference and real runs, checked in Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.monitor import rundata as R
from hpc.monitor.report import make_report
from hpc.util.io import atomic_write_json
from test_monitor_status import T0, simulate_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
IN_CI = os.environ.get("CI") == "true"
RECORD_IMAGES = ('<script>window.addEventListener("load",()=>{for(const i of document.images)'
                 'i.setAttribute("data-nw",i.naturalWidth+"x"+i.naturalHeight);'
                 'document.body.setAttribute("data-loaded","1")});</script></body>')


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=90)


def check_in_chromium(html: Path, tmp: Path, screenshot: bool = True) -> list[str]:
    """Load the page in headless Chromium; return the problems (empty = every image loaded, page drawn)."""
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("chromium not installed (apt-get install -y chromium): CI must check the report")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    problems = []
    # A copy of the page with a script that records each image's decoded size once everything loaded.
    probe = html.with_name("_probe.html")
    probe.write_text(html.read_text().replace("</body>", RECORD_IMAGES))
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp).stdout
    probe.unlink()
    if 'data-loaded="1"' not in dom:
        problems.append("page did not finish loading")
    sizes = re.findall(r'<img[^>]*data-nw="(\d+)x(\d+)"', dom)
    n_img = len(re.findall(r"<img\b", dom))
    if len(sizes) != n_img:
        problems.append(f"{n_img} <img> but {len(sizes)} recorded sizes")
    problems += [f"image {i} did not load (natural size {w}x{h})" for i, (w, h) in enumerate(sizes)
                 if int(w) == 0 or int(h) == 0]
    if not screenshot:
        return problems
    shot = tmp / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars", html.as_uri()], tmp)
    if not shot.is_file():
        return problems + ["no screenshot written"]
    import matplotlib.image as mpimg
    px = mpimg.imread(str(shot))[..., :3]
    nonwhite = float((px.mean(axis=2) < 0.9).mean())
    if px.std() < 0.05 or nonwhite < 0.02:
        problems.append(f"screenshot looks blank (std {px.std():.3f}, {100 * nonwhite:.1f}% non-white pixels)")
    return problems


def test_goodput_of_the_simulated_requeued_run(tmp_path):
    end = simulate_run(tmp_path)
    g = R.goodput(R.read_heartbeats(tmp_path))
    assert g["requeues"] == 1 and len(g["attempts"]) == 2
    # allocated = wall time minus the 120 s in the queue between the attempts (mean over ranks)
    assert g["queue_s"] == pytest.approx(120, abs=0.5)
    assert g["allocated_s"] == pytest.approx(end - T0 - 120, rel=0.05)
    a0, a1 = g["attempts"]
    # attempt 0 did steps 1-170, the requeue resumed at 151: 20 of its 170 steps were redone
    step0 = a0["productive_s"] + a0["redone_s"]
    assert a0["redone_s"] == pytest.approx(step0 * 20 / 170, rel=1e-6)
    assert a1["redone_s"] == 0 and a0["idle_s"] >= 8 and a1["idle_s"] >= 8   # the 8 s start-ups
    assert g["lost_to_requeues_s"] == pytest.approx(a0["redone_s"] + a1["idle_s"])
    assert 0.5 < g["goodput"] < 0.8 and g["goodput"] == pytest.approx(g["productive_s"] / g["allocated_s"])


def test_throughput_breaks_at_a_requeue_and_curves_keep_one_value_per_step():
    recs = [{"kind": "train", "step": s, "time": 100.0 + s} for s in range(10, 60, 10)]
    recs += [{"kind": "train", "step": s, "time": 500.0 + s, "loss": 1.0} for s in range(40, 90, 10)]
    xs, ys = R.throughput_from_metrics(recs, batch=64)
    assert sum(math.isnan(y) for y in ys) == 1
    assert all(y == pytest.approx(64) for y in ys if not math.isnan(y))  # 10 steps x 64 / 10 s
    steps, loss = R.curves(recs, "train")["loss"]
    assert steps == [40, 50, 60, 70, 80] and loss == [1.0] * 5


def test_report_of_simulated_run_and_sweep_renders_in_chromium(tmp_path):
    sweep = tmp_path / "runs" / "sim"
    simulate_run(sweep / "a", seed=1)
    simulate_run(sweep / "b", seed=2, finished=False)
    html, images = make_report(sweep / "a", tmp_path / "rep_a")
    names = {Path(i).stem for i in images}
    assert names == {"curves", "throughput", "step_times", "phases", "checkpoints", "goodput"}
    text = html.read_text()
    assert "goodput" in text and "requeue(s) lost" in text and "val accuracy" in text
    for img in images:
        assert (html.parent / img).stat().st_size > 5000
    assert check_in_chromium(html, tmp_path) == []
    # The check can fail: a damaged PNG is reported.
    (html.parent / images[0]).write_bytes(b"not a png")
    problems = check_in_chromium(html, tmp_path, screenshot=False)
    assert problems == ["image 0 did not load (natural size 0x0)"], problems
    html, images = make_report(sweep.parent, tmp_path / "rep_sweep")   # runs/: a directory of runs
    assert "sweep.png" in images and len(images) == 1 + 2 * 6
    assert "comparison of 2 runs" in html.read_text() and "sim/a" in html.read_text()


def test_report_of_an_inference_output(tmp_path):
    out = tmp_path / "preds"
    (out / "_parts").mkdir(parents=True)
    t = time.time() - 100
    for i in range(6):
        p = out / "_parts" / f"part-{i:05d}.json"
        atomic_write_json(p, {"file": f"part-{i:05d}.parquet", "shard": i, "rows": 1000 + 10 * i})
        os.utime(p, (t + 2 * i, t + 2 * i))
    atomic_write_json(out / "_MANIFEST.json", {"model": {"name": "digits", "version": 3}, "rows": 6150,
                                                "format": "parquet", "world_size": 2, "scoring_s": 11.0,
                                                "ranks": [{"rank": 0, "rows_written": 3030, "scoring_s": 10.0,
                                                           "written": 3, "skipped": 0},
                                                          {"rank": 1, "rows_written": 3120, "scoring_s": 11.0,
                                                           "written": 3, "skipped": 0}]})
    info = R.infer_progress(out)
    assert [r["rows_per_s"] for r in info["ranks"]] == [pytest.approx(303), pytest.approx(3120 / 11)]
    html, images = make_report(out, tmp_path / "rep")
    assert images == ["infer_rows.png"] and "digits@3" in html.read_text()


def test_report_errors(tmp_path):
    from hpc.cli import main
    assert main(["report", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run directories"):
        make_report(tmp_path / "empty")


@pytest.mark.slow
def test_report_of_a_real_short_training_run(tmp_path):
    from hpc.data.synth import SynthConfig, synth
    from hpc.data.writer import WriterConfig

    synth(SynthConfig("tabular", 2000, features=16, seed=5), tmp_path / "data",
          writer=WriterConfig(samples_per_shard=500))
    r = subprocess.run([sys.executable, "-m", "hpc", "train", "digits_softmax", f"data.dir={tmp_path / 'data'}",
                        f"out_dir={tmp_path / 'runs'}", "train.max_steps=30", "train.log_every=3",
                        "train.eval_every=10", "checkpoint.every_steps=10"],
                       capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = next((tmp_path / "runs" / "digits_softmax").iterdir())
    html, images = make_report(run_dir, tmp_path / "rep")
    names = {Path(i).stem for i in images}
    assert {"curves", "throughput"} <= names
    if (run_dir / "heartbeat").is_dir():  # once the trainer writes heartbeats (docs/operability.md)
        assert {"step_times", "phases", "checkpoints", "goodput"} <= names
    text = html.read_text()
    assert "test accuracy" in text and "completed" in text
    assert check_in_chromium(html, tmp_path) == []
    st = subprocess.run([sys.executable, "-m", "hpc", "status", str(run_dir), "--json"], capture_output=True,
                        text=True, timeout=60)
    assert json.loads(st.stdout)["state"] == "completed" and json.loads(st.stdout)["step"] == 30
