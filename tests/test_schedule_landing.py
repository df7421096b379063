"""Incremental scheduled scoring of a landing zone (hpc.launch.landing, schedule.run_landing).

Pure decisions (what is new/changed/unchanged given the ledger and each drop's path, size, mtime
and sha256; what gets hashed), the ledger and index files, a run with a stand-in for `hpc infer`
(shard-set drops, one truncated), Parquet and CSV drops scored in-process by a model trained from a
table, and on the dev Slurm cluster three daily unlabeled Parquet drops (and a shard set) scored by
the scheduler's own runner through sbatch (real `hpc infer`): every row scored exactly once across
runs, a rerun scores nothing, a drop replaced under its name is re-scored, a truncated Parquet drop
is named while the other new drops are scored, and nothing already published changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_slurm_preempt import state, wait_final

from hpc.cli import main
from hpc.launch import landing, schedule, tasks
from hpc.launch.landing import Drop
from hpc.launch.sbatch import SlurmResources
from hpc.train import run as train


def _drop(path, size=10, mtime=1, sha=None, kind="shards"):
    return Drop(path, kind, size, mtime, sha)


def _scored(path, sha, size=10, mtime=1, kind="shards"):
    return _drop(path, size, mtime, sha, kind).record("scored", output=f"scored/{path}-{sha[:12]}", rows=5,
                                                       time="t", run="r")


# ------------------------------------------------------------------------------- pure decisions
def test_only_new_or_touched_drops_are_hashed():
    records = [_scored("a", "1" * 64), _scored("b", "2" * 64),
               _drop("c", 7, 7, "3" * 64).record("failed", error="bad", exit=2)]
    known = landing.known_stats(records)
    seen = [_drop("a"), _drop("b", mtime=2), _drop("c", 7, 7), _drop("d")]
    assert landing.to_hash(known, seen) == ["b", "d"]           # b touched, d new; a and c as recorded
    filled = landing.with_known_hashes(known, seen)
    assert [d.sha256 for d in filled] == ["1" * 64, None, "3" * 64, None]


def test_classify_new_changed_unchanged_gone():
    scored = landing.scored_state([_scored("a", "1" * 64), _scored("b", "2" * 64), _scored("gone", "9" * 64),
                                   _scored("b", "4" * 64)])  # the last scoring of b counts
    seen = [_drop("d", sha="5" * 64), _drop("b", sha="2" * 64), _drop("a", sha="1" * 64), _drop("c", sha="6" * 64)]
    plan = landing.classify(scored, seen)
    assert [d.path for d in plan.new] == ["c", "d"]
    assert [(d.path, prev["sha256"]) for d, prev in plan.changed] == [("b", "4" * 64)]
    assert [d.path for d in plan.unchanged] == ["a"] and plan.gone == ["gone"]
    assert [d.path for d in plan.todo] == ["c", "d", "b"]
    # A failed attempt is not a scoring: the drop stays new until it scores.
    failed = _drop("c", sha="6" * 64).record("failed", error="x", exit=2)
    assert [d.path for d in landing.classify(landing.scored_state([failed]), seen[3:]).new] == ["c"]


def test_touched_but_identical_drop_is_recorded_so_it_is_not_hashed_again():
    known = landing.known_stats([_scored("a", "1" * 64)])
    unchanged = [_drop("a", size=10, mtime=99, sha="1" * 64)]
    (rec,) = landing.restat_records(known, unchanged)
    assert rec["event"] == "seen" and rec["mtime_ns"] == 99
    assert landing.to_hash(landing.known_stats([_scored("a", "1" * 64), rec]), unchanged) == []
    assert landing.restat_records(known, [_drop("a", sha="1" * 64)]) == []  # same stat: nothing to record


def test_output_names_and_index_are_per_input_and_content():
    d = _drop("2024/01/day one.parquet", sha="ab" * 32, kind="parquet")
    assert landing.output_name(d) == f"scored/2024__01__day_one.parquet-{'ab' * 6}"
    idx = landing.build_index(landing.scored_state([_scored("b", "2" * 64), _scored("a", "1" * 64)]), "/in", "now")
    assert [i["input"] for i in idx["inputs"]] == ["a", "b"] and idx["rows"] == 10
    assert landing.same_index(idx, landing.build_index(landing.scored_state([_scored("a", "1" * 64),
                                                                             _scored("b", "2" * 64)]), "/in", "later"))


# ------------------------------------------------------------------------------- the zone and the files
def _shards(d: Path, files: dict[str, bytes]) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def test_find_drops_parquet_and_shard_sets_at_any_depth(tmp_path):
    _shards(tmp_path / "day1", {"shard-0.h5": b"x"})
    (tmp_path / "2024" / "02").mkdir(parents=True)
    (tmp_path / "2024" / "02" / "a.parquet").write_bytes(b"p")
    (tmp_path / "b.PARQUET").write_bytes(b"p")
    (tmp_path / ".c.parquet").write_bytes(b"copy in progress")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "d.parquet").write_bytes(b"p")
    (tmp_path / "notes.txt").write_text("?")
    (tmp_path / "e.csv").write_text("a,b\n1,2\n")
    drops, ignored = landing.find_drops(tmp_path)
    assert drops == [("2024/02/a.parquet", "parquet"), ("b.PARQUET", "parquet"), ("day1", "shards"), ("e.csv", "csv")]
    assert ignored == ["notes.txt"]


def test_observe_hashes_streamed_and_only_what_changed(tmp_path):
    zone = tmp_path / "zone"
    _shards(zone / "day1", {"shard-0.h5": b"a" * 100})
    _shards(zone / "day2", {"shard-0.h5": b"b" * 100})
    (zone / "t.parquet").write_bytes(b"table")
    calls = []

    def hasher(root, d):
        calls.append(d.path)
        return landing.hash_drop(root, d)

    seen, hashed, _ = landing.observe(zone, {}, hasher)
    assert sorted(calls) == sorted(hashed) == ["day1", "day2", "t.parquet"]
    records = [d.record("scored", output="o", rows=1, time="t") for d in seen]
    calls.clear()
    again, hashed, _ = landing.observe(zone, landing.known_stats(records), hasher)
    assert calls == [] and hashed == [] and again == seen                  # nothing touched: nothing hashed
    st = (zone / "day2" / "shard-0.h5").stat()
    (zone / "day2" / "shard-0.h5").write_bytes(b"c" * 100)                 # same size, new bytes
    os.utime(zone / "day2" / "shard-0.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    later, hashed, _ = landing.observe(zone, landing.known_stats(records), hasher)
    assert calls == hashed == ["day2"]
    plan = landing.classify(landing.scored_state(records), later)
    assert [d.path for d, _ in plan.changed] == ["day2"] and len(plan.unchanged) == 2
    # A shard set's hash covers its files' names and bytes, not just the manifest.
    assert landing.hash_drop(zone, later[1]) != seen[1].sha256


def test_ledger_appends_atomically_and_names_a_bad_line(tmp_path):
    path = tmp_path / landing.LEDGER
    landing.append_ledger(path, [{"event": "scored", "path": "a"}])
    landing.append_ledger(path, [{"event": "failed", "path": "b"}, {"event": "seen", "path": "a"}])
    assert [r["path"] for r in landing.read_ledger(path)] == ["a", "b", "a"]
    assert not [p for p in tmp_path.iterdir() if p.name != landing.LEDGER]  # no temporary file left
    path.write_text(path.read_text() + "{torn\n")
    with pytest.raises(ValueError, match=rf"{landing.LEDGER}:4: not a JSON record"):
        landing.read_ledger(path)


def test_a_second_run_at_the_same_time_does_nothing(tmp_path):
    with landing.locked(tmp_path) as first:
        with landing.locked(tmp_path) as second:
            assert first and not second
    with landing.locked(tmp_path) as again:
        assert again


# ------------------------------------------------------------------------------- runs (stand-in scorer)
@pytest.fixture
def fake_infer(tmp_path, monkeypatch):
    """`hpc infer` stand-in: counts rows of a drop ("rows: N" in the manifest), refuses a drop whose
    shard file is truncated (shorter than the manifest says) with a ValueError, as check_shards does."""
    calls = []

    def infer_task(cfg, nproc=1):
        man = json.loads((Path(cfg.input) / "manifest.json").read_text())
        size = (Path(cfg.input) / "shard-0.h5").stat().st_size
        if size != man["bytes"]:
            raise ValueError(f"{cfg.input}/shard-0.h5: size {size} bytes, manifest says {man['bytes']} (truncated)")
        calls.append(cfg.input)
        os.makedirs(cfg.output)
        Path(cfg.output, "_MANIFEST.json").write_text(json.dumps({"rows": man["rows"], "model": {"name": "m", "version": 3}}))
        Path(cfg.output, "_SUCCESS").write_text("")
        return {"state": "done"}

    monkeypatch.setattr(tasks, "infer_task", infer_task)
    return calls


def _day(zone: Path, name: str, rows: int, fill: bytes = b"x") -> Path:
    data = fill * (rows * 10)
    d = _shards(zone / name, {"shard-0.h5": data})
    (d / "manifest.json").write_text(json.dumps({"rows": rows, "bytes": len(data)}))
    return d


def test_landing_runs_score_each_drop_once_rescore_changes_and_name_bad_ones(tmp_path, fake_infer, capsys):
    zone, root = tmp_path / "landing", tmp_path / "scored"
    zone.mkdir()
    run = lambda: schedule.run_scheduled("n", "m@production", str(zone), str(root))  # noqa: E731

    _day(zone, "day1", 4)
    run()
    assert [Path(c).name for c in fake_infer] == ["day1"]
    _day(zone, "day2", 5)
    _day(zone, "day3", 6)
    run()
    assert [Path(c).name for c in fake_infer] == ["day1", "day2", "day3"]
    index = json.loads((root / landing.INDEX).read_text())
    assert [(i["input"], i["rows"]) for i in index["inputs"]] == [("day1", 4), ("day2", 5), ("day3", 6)]
    assert index["rows"] == 15 and all((root / i["output"] / "_SUCCESS").is_file() for i in index["inputs"])
    capsys.readouterr()

    before = (root / landing.INDEX).read_bytes()
    run()                                                          # nothing new: exit 0, says so
    assert len(fake_infer) == 3 and "nothing new to score" in capsys.readouterr().out
    assert (root / landing.INDEX).read_bytes() == before

    shutil.rmtree(zone / "day2")
    _day(zone, "day2", 7, fill=b"y")                               # same name, new content
    bad = _day(zone, "day4", 3)
    with open(bad / "shard-0.h5", "r+b") as f:
        f.truncate(10)                                             # a truncated drop
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert "re-scored (content changed" in out and "day2: 7 rows" in out
    assert "FAILED day4" in err and "truncated" in err
    index = json.loads((root / landing.INDEX).read_text())
    assert [(i["input"], i["rows"]) for i in index["inputs"]] == [("day1", 4), ("day2", 7), ("day3", 6)]
    outputs = sorted(p.name.rsplit("-", 1)[0] for p in (root / landing.SCORED).iterdir())
    assert outputs == ["day1", "day2", "day2", "day3"]             # nothing half-written for day4
    events = [(r["event"], r["path"]) for r in landing.read_ledger(root / landing.LEDGER)]
    assert events == [("scored", "day1"), ("scored", "day2"), ("scored", "day3"), ("failed", "day4"),
                      ("scored", "day2")]

    # The bad drop is fixed: only it is scored.
    shutil.rmtree(bad)
    _day(zone, "day4", 3)
    run()
    assert [Path(c).name for c in fake_infer][-1:] == ["day4"] and len(fake_infer) == 5
    assert json.loads((root / landing.INDEX).read_text())["rows"] == 20

    # A scored drop replaced by a truncated one: named, and what was published for it stays.
    before = (root / landing.INDEX).read_bytes()
    with open(zone / "day1" / "shard-0.h5", "ab") as f:
        f.write(b"more")
    with pytest.raises(SystemExit):
        run()
    err = capsys.readouterr().err
    assert "FAILED day1" in err and "the index keeps its previous scoring" in err
    assert (root / landing.INDEX).read_bytes() == before and len(fake_infer) == 5


def test_landing_refusals_name_the_problem(tmp_path):
    zone = tmp_path / "landing"
    zone.mkdir()
    with pytest.raises(ValueError, match="must be outside --input"):
        schedule.run_scheduled("n", "m@1", str(zone), str(zone / "out"))
    with pytest.raises(ValueError, match="does not exist"):
        schedule.run_scheduled("n", "m@1", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "fixed").mkdir()
    os.symlink("r1", tmp_path / "fixed" / "latest")
    with pytest.raises(ValueError, match="a landing zone needs an output root of its own"):
        schedule.run_scheduled("n", "m@1", str(zone), str(tmp_path / "fixed"))
    assert schedule._main(["--name", "n", "--model", "m@1", "--input", str(tmp_path / "nowhere"),
                           "--output", str(tmp_path / "o")]) == 2


# ------------------------------------------------------------------------------- Parquet drops (real hpc infer)
def _table(n: int, seed: int, label: bool = False):
    x = np.random.default_rng(seed).normal(size=(n, 4))
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "d": x[:, 3]})
    if label:
        df["label"] = (x[:, 0] + x[:, 1] > 0).astype(int)
    return df


def test_parquet_drops_scored_once_changed_rescored_corrupt_named(tmp_path, monkeypatch, capsys):
    """A model trained from a table scores Parquet (and CSV) drops, each once, with `hpc infer` itself."""
    monkeypatch.chdir(tmp_path)
    _table(300, 0, label=True).to_parquet("train.parquet")
    assert main(["data", "shard", "--from", "train.parquet", "--label", "label", "--out", "data"]) == 0
    train({"name": "tab", "data": {"dir": "data", "batch_size": 32}, "model": {"family": "softmax"},
           "train": {"epochs": 1, "progress": False},
           "registry": {"name": "tab", "alias": "production", "root": "registry"}})
    zone, root = tmp_path / "landing", tmp_path / "scored"
    (zone / "2024" / "02").mkdir(parents=True)
    _table(40, 1).to_parquet(zone / "day1.parquet")
    _table(25, 2).to_parquet(zone / "2024" / "02" / "day2.parquet")
    _table(15, 3).to_csv(zone / "day3.csv", index=False)
    run = lambda: schedule.run_scheduled("tab", "tab@production", str(zone), str(root), registry="registry")  # noqa: E731

    run()
    index = json.loads((root / landing.INDEX).read_text())
    assert [(i["input"], i["kind"], i["rows"]) for i in index["inputs"]] == [
        ("2024/02/day2.parquet", "parquet", 25), ("day1.parquet", "parquet", 40), ("day3.csv", "csv", 15)]
    for i in index["inputs"]:
        assert sorted(pd.read_parquet(root / i["output"])["row_id"]) == list(range(i["rows"]))
    capsys.readouterr()
    run()
    assert "nothing new to score" in capsys.readouterr().out

    _table(60, 11).to_parquet(zone / "day1.parquet")               # the same name, new rows
    good = (zone / "2024" / "02" / "day2.parquet").read_bytes()
    (zone / "day4.parquet").write_bytes(good[: len(good) // 2])     # a truncated upload
    with pytest.raises(SystemExit) as exc:
        run()
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "re-scored (content changed" in out and "day1.parquet: 60 rows" in out
    assert "FAILED day4.parquet" in err and "cannot read it as Parquet" in err
    index = json.loads((root / landing.INDEX).read_text())
    assert [(i["input"], i["rows"]) for i in index["inputs"]] == [
        ("2024/02/day2.parquet", 25), ("day1.parquet", 60), ("day3.csv", 15)]


# ------------------------------------------------------------------------------- on the dev Slurm cluster
def _put(path: Path, ids, seed: int) -> list[int]:
    """An unlabeled Parquet drop (the model's feature columns and an ``event_id`` column), written
    under a hidden name and moved into the zone as one rename, as operators drop files."""
    ids = [int(i) for i in ids]
    df = _table(len(ids), seed)
    df.insert(0, "event_id", np.asarray(ids, dtype=np.int64))
    tmp = path.with_name(f".{path.name}.part")
    df.to_parquet(tmp)
    os.replace(tmp, path)
    return ids


def _put_shards(zone: Path, name: str, ids, seed: int, tmp: Path) -> list[int]:
    """A shard-set drop of the same kind of rows, sharded with the model's recorded table transform."""
    table = tmp / f"{name}.parquet"
    ids = _put(table, ids, seed)
    assert main(["data", "shard", "--from", str(table), "--transform", str(tmp / "data" / "train"),
                 "--out", str(tmp / f"src-{name}")]) == 0
    os.replace(tmp / f"src-{name}" / "all", zone / name)
    return ids


def _scored_ids(out: Path) -> list[int]:
    """The ``event_id`` of every row of one output directory, checking its ``row_id`` are 0..n-1."""
    df = pd.read_parquet(out)
    assert sorted(df["row_id"].tolist()) == list(range(len(df))), out
    return [int(i) for i in df["event_id"]]


def _files_under(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _exit_code(job: str) -> int | None:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(r"\bExitCode=(\d+):", out)
    return int(m.group(1)) if m else None


@pytest.mark.slurm
def test_daily_unlabeled_parquet_drops_scored_through_slurm_once_each(slurm_cluster, tmp_path, capsys, monkeypatch):
    """A model trained from a table; three daily unlabeled Parquet drops scored by the scheduler's own
    runner through sbatch (real `hpc infer`): every row once across runs, a rerun scores nothing, a
    replaced drop is re-scored, a truncated one is named while the other new drops are scored."""
    monkeypatch.setenv("HPC_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    labeled = _table(300, 0, label=True)
    labeled.insert(0, "event_id", np.arange(300))
    labeled.to_parquet("train.parquet")
    assert main(["data", "shard", "--from", "train.parquet", "--label", "label", "--out", "data"]) == 0
    registry = tmp_path / "registry"
    train({"name": "tab", "data": {"dir": str(tmp_path / "data"), "batch_size": 32}, "model": {"family": "softmax"},
           "train": {"epochs": 1, "progress": False},
           "registry": {"name": "tab", "alias": "production", "root": str(registry)}})
    zone, root = tmp_path / "landing", tmp_path / "scored"
    zone.mkdir()
    drops = {"day-01.parquet": _put(zone / "day-01.parquet", range(1000, 1230), 1)}  # what the zone holds
    contents = list(drops.values())                    # every content ever dropped and readable

    # Run 1: installed like any schedule (scrontab, or the crontab line where there is none) and
    # submitted once now: the very command the entry runs, through sbatch.
    assert main(["schedule", "infer", "--cron", "0 2 * * *", "--model", "tab@production", "--input", str(zone),
                 "--output", str(root), "--registry", str(registry), "--name", "landing-test",
                 "--time", "10", "--run-now"]) == 0
    out = capsys.readouterr().out
    assert f"{zone} is a landing zone" in out
    if "not installed" not in out:
        assert main(["schedule", "remove", "landing-test"]) == 0
    sched = schedule.Schedule(name="landing-test", cron="0 2 * * *", model="tab@production", input=str(zone),
                              output=str(root), registry=str(registry), res=SlurmResources(time="10"))

    def wait(job: str, want: str) -> str:
        got = wait_final(job, 240)
        log = (root / ".logs" / f"{job}.out").read_text()
        assert got == want, f"job {job}: {state(job)}\n{log}"
        return log

    def check() -> dict:
        """The index lists what the zone holds, each output has its drop's rows, and across every
        output ever written (re-scorings included) each row of each content is scored exactly once."""
        index = json.loads((root / landing.INDEX).read_text())
        assert {i["input"]: i["rows"] for i in index["inputs"]} == {p: len(v) for p, v in drops.items()}
        assert index["rows"] == sum(len(v) for v in drops.values())
        for entry in index["inputs"]:
            assert sorted(_scored_ids(root / entry["output"])) == drops[entry["input"]]
        every = [i for out in sorted((root / landing.SCORED).iterdir()) for i in _scored_ids(out)]
        assert sorted(every) == sorted(i for ids in contents for i in ids)
        return index

    log = wait(out.split("submitted one run now: job ")[1].split()[0], "COMPLETED")
    assert "1 new, 0 changed, 0 already scored" in log and "scored day-01.parquet: 230 rows" in log
    check()

    # Run 2: two more days arrived together.
    drops["day-02.parquet"] = _put(zone / "day-02.parquet", range(2000, 2170), 2)
    drops["day-03.parquet"] = _put(zone / "day-03.parquet", range(3000, 3120), 3)
    contents += [drops["day-02.parquet"], drops["day-03.parquet"]]
    log = wait(schedule.run_now(sched), "COMPLETED")
    assert "2 new, 0 changed, 1 already scored" in log
    assert "scored day-02.parquet: 170 rows" in log and "scored day-03.parquet: 120 rows" in log
    assert check()["rows"] == 520

    # Run 3: nothing new: exit 0, says so, publishes nothing, writes no output.
    before, outputs = (root / landing.INDEX).read_bytes(), _files_under(root / landing.SCORED)
    log = wait(schedule.run_now(sched), "COMPLETED")
    assert "0 hashed" in log and "nothing new to score" in log
    assert (root / landing.INDEX).read_bytes() == before and _files_under(root / landing.SCORED) == outputs

    # Run 4: day-02 replaced under the same name; day-04 arrives truncated; day-05 (Parquet) and
    # day-06 (a shard set) arrive whole.
    published = {i["input"]: i for i in json.loads(before)["inputs"]}
    drops["day-02.parquet"] = _put(zone / "day-02.parquet", range(2500, 2640), 22)
    _put(tmp_path / "day-04.parquet", range(4000, 4150), 4)
    good = (tmp_path / "day-04.parquet").read_bytes()
    (zone / ".day-04.parquet.part").write_bytes(good[: len(good) // 2])  # an upload cut short
    os.replace(zone / ".day-04.parquet.part", zone / "day-04.parquet")
    drops["day-05.parquet"] = _put(zone / "day-05.parquet", range(5000, 5090), 5)
    drops["day-06"] = _put_shards(zone, "day-06", range(6000, 6060), 6, tmp_path)
    contents += [drops["day-02.parquet"], drops["day-05.parquet"], drops["day-06"]]
    job = schedule.run_now(sched)
    log = wait(job, "FAILED")
    assert _exit_code(job) == 2, f"job {job}\n{log}"   # bad input: exit 2
    assert "3 new, 1 changed, 2 already scored" in log
    assert "re-scored (content changed" in log and "day-02.parquet: 140 rows" in log
    assert "scored day-05.parquet: 90 rows" in log and "scored day-06: 60 rows" in log
    assert "FAILED day-04.parquet" in log and "cannot read it as Parquet" in log
    index = check()
    assert index["rows"] == 230 + 140 + 120 + 90 + 60
    # Nothing already published changed: day-01 and day-03 as they were, every earlier output byte
    # for byte (day-02's first scoring included), and nothing written for day-04.
    now = {i["input"]: i for i in index["inputs"]}
    assert now["day-01.parquet"] == published["day-01.parquet"] and now["day-03.parquet"] == published["day-03.parquet"]
    assert now["day-02.parquet"]["sha256"] != published["day-02.parquet"]["sha256"]
    after = _files_under(root / landing.SCORED)
    assert {k: after.get(k) for k in outputs} == outputs
    assert not [p for p in (root / landing.SCORED).iterdir() if p.name.startswith("day-04")]
    scored = [(r["path"], r["sha256"]) for r in landing.read_ledger(root / landing.LEDGER) if r["event"] == "scored"]
    assert len(scored) == len(set(scored)) == 6          # no (input, content) scored twice
    assert [p for p, _ in scored] == ["day-01.parquet", "day-02.parquet", "day-03.parquet",  # new ones first
                                      "day-05.parquet", "day-06", "day-02.parquet"]
