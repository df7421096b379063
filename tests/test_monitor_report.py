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


@pytest.fixture
def drawn(monkeypatch):
    """Every plot/bar/barh call on a matplotlib Axes during the test, as (axes, method, args): what a
    report drew (axis scales, titles, the plotted numbers), which Chromium cannot see in a PNG."""
    import matplotlib.axes
    calls = []
    for name in ("plot", "bar", "barh"):
        def spy(self, *args, _orig=getattr(matplotlib.axes.Axes, name), _name=name, **kw):
            calls.append((self, _name, args))
            return _orig(self, *args, **kw)
        monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    return calls


def _fact(html_text: str, name: str) -> str:
    """A value of a report's two-column facts table."""
    m = re.search(rf"<tr><td class=l>{re.escape(name)}</td><td[^>]*>([^<]*)</td></tr>", html_text)
    assert m, f"no {name!r} row in the report"
    return m.group(1)


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
    # the 8 s start-ups (process start to first step) are start-up, not idle
    assert a1["redone_s"] == 0
    assert a0["startup_s"] == pytest.approx(8, abs=0.01) and a1["startup_s"] == pytest.approx(8, abs=0.01)
    assert a0["idle_s"] < 2 and a1["idle_s"] < 2      # 2 ms per step outside the phases
    # the requeue's restart is lost time; the first launch is stated apart, outside goodput
    assert g["startup_s"] == pytest.approx(8, abs=0.01) and g["restart_s"] == pytest.approx(8, abs=0.01)
    assert g["lost_to_requeues_s"] == pytest.approx(a0["redone_s"] + a1["startup_s"])
    assert 0.5 < g["goodput"] < 0.8
    assert g["goodput"] == pytest.approx(g["productive_s"] / (g["allocated_s"] - g["startup_s"]))


def test_goodput_of_a_healthy_short_run_excludes_start_up(tmp_path):
    """10 s of a healthy run: 8 s of start-up, then 2 s of steps. Goodput is about the steps."""
    from hpc.instrument import Heartbeat
    from test_monitor_status import Clock

    clock = Clock(T0)
    hb = Heartbeat(tmp_path, 0, interval_s=5, world_size=1, start=False, clock=clock)
    clock.t += 8.0
    for step in range(1, 21):
        with hb.phase("data"):
            clock.t += 0.01
        with hb.phase("compute"):
            clock.t += 0.09
        hb.set_step(step, 0, samples=64)
    hb.close("completed")
    g = R.goodput(R.read_heartbeats(tmp_path))
    assert g["allocated_s"] == pytest.approx(10) and g["startup_s"] == pytest.approx(8)
    assert g["goodput"] == pytest.approx(1.0)          # was 0.2: start-up counted as idle
    html, _ = make_report(tmp_path, tmp_path / "rep")
    text = html.read_text()
    assert "start-up 8.0 s (process start to the first step" in text and "goodput 100.0%" in text


def test_throughput_breaks_at_a_requeue_and_curves_keep_one_value_per_step():
    recs = [{"kind": "train", "step": s, "time": 100.0 + s, "samples_per_s": 64.0} for s in range(10, 60, 10)]
    recs += [{"kind": "train", "step": s, "time": 500.0 + s, "loss": 1.0, "samples_per_s": 60.0}
             for s in range(40, 90, 10)]
    xs, ys = R.throughput_from_metrics(recs)   # the trainer's own figure, one line per attempt
    assert sum(math.isnan(y) for y in ys) == 1 and len(ys) == 11
    assert [y for y in ys if not math.isnan(y)] == [64.0] * 5 + [60.0] * 5
    steps, loss = R.curves(recs, "train")["loss"]
    assert steps == [40, 50, 60, 70, 80] and loss == [1.0] * 5


def test_report_of_simulated_run_and_sweep_renders_in_chromium(tmp_path):
    sweep = tmp_path / "runs" / "sim"
    simulate_run(sweep / "a", seed=1)
    simulate_run(sweep / "b", seed=2, finished=False)
    html, images = make_report(sweep / "a", tmp_path / "rep_a")
    names = {Path(i).stem for i in images}
    assert names == {"curves", "optimizer", "throughput", "step_times", "phases", "checkpoints", "goodput"}
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
    assert "sweep.png" in images and len(images) == 1 + 2 * 7
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
    assert {"curves", "optimizer", "throughput"} <= names
    if (run_dir / "heartbeat").is_dir():  # once the trainer writes heartbeats (docs/operability.md)
        assert {"step_times", "phases", "checkpoints", "goodput"} <= names
        g = R.goodput(R.read_heartbeats(run_dir))
        assert g["startup_s"] > 0   # the trainer's heartbeats mark its first step: start-up is told apart
        assert g["goodput"] == pytest.approx(g["productive_s"] / (g["allocated_s"] - g["startup_s"]))
    text = html.read_text()
    assert "test accuracy" in text and "completed" in text
    assert check_in_chromium(html, tmp_path) == []
    st = subprocess.run([sys.executable, "-m", "hpc", "status", str(run_dir), "--json"], capture_output=True,
                        text=True, timeout=60)
    st = json.loads(st.stdout)
    assert st["state"] == "completed" and st["step"] == 30
    summary = json.loads((run_dir / "summary.json").read_text())
    assert st["samples_per_s"] == pytest.approx(summary["samples_per_s"], abs=0.01)
    assert float(_fact(text, "samples/s").replace(",", "")) == pytest.approx(summary["samples_per_s"], rel=1e-3)


def test_report_has_loss_on_a_log_axis_and_lr_and_grad_norm_panels(tmp_path, drawn):
    simulate_run(tmp_path / "run")
    html, images = make_report(tmp_path / "run", tmp_path / "rep")
    assert {"curves.png", "optimizer.png"} <= set(images)
    axes = {ax.get_title(): ax for ax, _, _ in drawn}
    assert axes["loss (log scale)"].get_yscale() == "log"
    assert axes["accuracy"].get_yscale() == "linear"
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    lr = [c for c in drawn if c[0].get_title().startswith("learning rate")]
    gn = [c for c in drawn if c[0].get_title().startswith("gradient norm")]
    assert lr and list(lr[0][2][1]) == pytest.approx([m["lr"] for m in train])
    assert gn and list(gn[0][2][1]) == pytest.approx([m["grad_norm"] for m in train])
    assert gn[0][0].get_yscale() == "log"     # spikes span decades
    text = html.read_text()
    assert 'alt="learning rate and gradient norm per step"' in text and "(loss on a log axis)" in text
    assert check_in_chromium(html, tmp_path) == []


def test_samples_per_s_is_the_same_in_status_and_report(tmp_path):
    from hpc.monitor.status import collect_status

    for name, finished in (("live", False), ("done", True)):
        end = simulate_run(tmp_path / name, finished=finished)
        st = collect_status(tmp_path / name, now=end + 1)
        html, _ = make_report(tmp_path / name, tmp_path / f"rep_{name}")
        text = html.read_text()
        shown = float(_fact(text, "samples/s").replace(",", ""))
        assert shown == pytest.approx(st["samples_per_s"], rel=1e-3), name   # the table shows 4 digits
        assert _fact(text, "samples/s from") == st["samples_per_s_from"]
        assert "samples/s = global samples in completed optimizer steps / seconds spent in those steps" in text


def test_inference_report_table_and_chart_show_the_same_rows_per_s(tmp_path, drawn):
    """Two ranks, 3 partitions each: the first one after a 5 s warm-up, then one every 0.5 s, both
    ranks finishing theirs within 10 ms of each other (which made the old per-gap chart spike)."""
    out = tmp_path / "preds"
    (out / "_parts").mkdir(parents=True)
    t0 = time.time() - 100
    for rank in range(2):
        for j in range(3):
            shard = 3 * rank + j
            p = out / "_parts" / f"part-{shard:05d}.json"
            atomic_write_json(p, {"file": f"part-{shard:05d}.parquet", "shard": shard, "rows": 1000})
            t = t0 + 5 + 0.5 * j + 0.01 * rank
            os.utime(p, (t, t))
    ranks = [{"rank": r, "rows_written": 3000, "scoring_s": 6.0 + 0.01 * r, "written": 3, "skipped": 0}
             for r in range(2)]
    atomic_write_json(out / "_MANIFEST.json", {"model": {"name": "digits", "version": 3}, "rows": 6000,
                                                "format": "parquet", "world_size": 2, "scoring_s": 6.01,
                                                "ranks": ranks})
    html, images = make_report(out, tmp_path / "rep")
    text = html.read_text()
    rows = re.findall(r"<tr><td[^>]*>(rank|\d+|all ranks)</td><td>([\d,]+)</td><td>([\d.,]+)</td><td>([\d.,]+)</td>",
                      text)
    table = {r[0]: float(r[3].replace(",", "")) for r in rows}
    assert table == pytest.approx({"0": 500.0, "1": 3000 / 6.01, "all ranks": 6000 / 6.01}, rel=1e-3)
    bars = [c for c in drawn if c[1] == "barh"]   # (barh's own inner bar call has no positional args)
    assert len(bars) == 1 and list(bars[0][2][1]) == pytest.approx([500.0, 3000 / 6.01, 6000 / 6.01])
    curve = next(c for c in drawn if c[1] == "plot" and c[0].get_ylabel() == "rows written")
    xs, cum = curve[2][0], curve[2][1]
    assert cum[0] == 0 and cum[-1] == 6000 and xs[0] == 0
    assert cum[-1] / xs[-1] == pytest.approx(table["all ranks"], rel=1e-3)  # its mean slope: the same figure
    # nothing drawn claims a rate the table does not: no per-gap spikes
    rates = [v for ax, m, a in drawn if a and "rows/s" in ax.get_xlabel() + ax.get_ylabel() for v in a[-1]]
    assert rates and max(rates) <= max(table.values()) * 1.001
    assert "rows/s = rows written / scoring seconds" in text
