"""Data layouts: data.train / data.val / data.test may each point at any split directory, data.dir
stays the shorthand for DIR/train etc.; a missing val split is said at start; errors name the key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from hpc.cli import main
from hpc.train import run
from hpc.train.config import load_config
from hpc.train.inputs import split_dirs


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A lab's layout: the training split in fd/, the test split in fd-test/, nothing else."""
    root = tmp_path_factory.mktemp("layouts")
    assert main(["data", "synth", "--kind", "tabular", "--samples", "600", "--classes", "3", "--features", "6",
                 "--split", "train=0.7,val=0.1,test=0.2", "--out", str(root / "synth")]) == 0
    shutil.copytree(root / "synth" / "train", root / "fd")
    shutil.copytree(root / "synth" / "test", root / "fd-test")
    return root


def _cfg(root: Path, data: dict) -> dict:
    return {"name": "layout", "out_dir": str(root / "runs"), "data": {"batch_size": 32, **data},
            "model": {"family": "softmax"}, "optim": {"lr": 0.1},
            "train": {"epochs": 2, "progress": False}}


def test_split_dirs_from_keys_and_from_the_shorthand(lab):
    d = load_config(_cfg(lab, {"train": str(lab / "fd"), "test": str(lab / "fd-test")})).data
    assert split_dirs(d) == {"train": lab / "fd", "test": lab / "fd-test"}
    d = load_config(_cfg(lab, {"dir": str(lab / "synth")})).data
    assert split_dirs(d) == {s: lab / "synth" / s for s in ("train", "val", "test")}
    # A key wins over DIR/<split>; the other splits still come from DIR.
    d = load_config(_cfg(lab, {"dir": str(lab / "synth"), "test": str(lab / "fd-test")})).data
    assert split_dirs(d) == {"train": lab / "synth" / "train", "val": lab / "synth" / "val", "test": lab / "fd-test"}
    # A config with data.dir, pointed at the lab's splits alone from the command line.
    d = load_config(_cfg(lab, {"dir": str(lab / "synth")}),
                    ["data.dir=null", f"data.train={lab / 'fd'}", f"data.test={lab / 'fd-test'}"]).data
    assert d.dir is None and split_dirs(d) == {"train": lab / "fd", "test": lab / "fd-test"}


def test_lab_layout_trains_without_rearranging_and_says_there_is_no_val(lab, capfd):
    summary = run(_cfg(lab, {"train": str(lab / "fd"), "test": str(lab / "fd-test")}), ["run_id=lab"])
    assert summary["state"] == "completed"
    err = capfd.readouterr().err
    said = err.index("no validation split: best model = last")
    assert said < err.index("run ") < err.index("test (best model")  # at start, before the first step
    run_dir = Path(summary["run_dir"])
    assert "no validation split" in (run_dir / "logs" / "rank-0.log").read_text()
    assert summary["metrics"]["test"]["samples"] > 0 and summary["metrics"]["val"] == {}
    assert summary["data"]["splits"] == {"train": str((lab / "fd").resolve()), "test": str((lab / "fd-test").resolve())}
    best, last = (load_file(run_dir / "models" / f"{m}.safetensors") for m in ("best", "last"))
    assert best.keys() == last.keys() and all(best[k].equal(last[k]) for k in best)


@pytest.mark.parametrize("data,message", [
    ({"train": "{lab}/fd", "val": "{lab}/nowhere"}, r"config\.data\.val: no manifest .*nowhere/manifest\.json: .*nowhere does not exist"),
    ({"train": "{lab}/fd", "test": "{lab}"}, r"config\.data\.test: no manifest .*: .* is not a split directory "
                                             r".*it holds the splits fd, fd-test"),
    ({"train": "{lab}/synth"}, r"config\.data\.train: no manifest .*synth/manifest\.json: .* set data\.dir=.*synth"),
    ({"dir": "{lab}/fd"}, r"config\.data\.dir: .*fd is a split directory itself .* set data\.train=.*fd instead"),
    ({"dir": "{lab}/nowhere"}, r"config\.data\.dir: no training split: no manifest .*nowhere/train/manifest\.json: .*does not exist; "
                              r"or set data\.train"),
    ({}, r"config\.data\.dir: is required .*unless data\.train names the training split"),
    ({"dir": "{lab}/synth", "val": ""}, r"config\.data\.val: is empty"),
])
def test_layout_errors_name_the_key_and_exit_2(lab, tmp_path, capsys, data, message):
    data = {k: v.format(lab=lab) for k, v in data.items()}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**_cfg(lab, data), "out_dir": str(tmp_path / "runs")}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()  # refused before any run directory
