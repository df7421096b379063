"""The Python API: `import hpc` stays cheap; hpc.train / hpc.infer / hpc.load(...).predict, whose
predictions for numpy arrays, torch tensors and DataFrames equal what `hpc infer` writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hpc
from hpc.data.reader import iter_shard
from hpc.data.sources import shard_source
from hpc.data.synth import SynthConfig, synth
from hpc.data.writer import WriterConfig
from hpc.registry import IntegrityError, Registry
from test_export import one_thread  # noqa: F401  (autouse: torch with 1 thread)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An MLP on digits and an MF recommender, trained and registered through hpc.train(...)."""
    root = tmp_path_factory.mktemp("api")
    shard_source("sklearn:digits", root / "digits", split="train=0.8,val=0.1,test=0.1", seed=0,
                 config=WriterConfig(samples_per_shard=100))
    synth(SynthConfig(kind="ratings", samples=1500, users=30, items=20, seed=2), root / "ratings",
          writer=WriterConfig(samples_per_shard=64))
    reg = str(root / "reg")
    for name, data, family, config in (("digits", "digits", "mlp", {"widths": [32]}),
                                       ("rec", "ratings", "mf", {})):
        s = hpc.train({"name": name, "out_dir": str(root / "runs"),
                       "data": {"dir": str(root / data), "batch_size": 32},
                       "model": {"family": family, "config": config}, "optim": {"name": "adam", "lr": 0.01},
                       "train": {"epochs": 2, "progress": False},
                       "registry": {"name": name, "alias": "production", "root": reg}})
        assert s["state"] == "completed"
    return root


def test_import_hpc_is_cheap_and_lists_its_api():
    code = ("import sys, hpc\n"
            "assert 'torch' not in sys.modules, 'import hpc imported torch'\n"
            "print(' '.join(n for n in dir(hpc) if not n.startswith('_')))\n"
            "from hpc.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'hpc --help imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[0] == "Model export infer load train"
    assert callable(hpc.train) and callable(hpc.infer) and hpc.train.run is not None  # packages stay packages


def _rows(split) -> dict[str, np.ndarray]:
    """A split's rows in manifest order (what `hpc infer` writes, by row_id)."""
    from hpc.data.manifest import load_manifest

    m = load_manifest(split)
    batches = [b for s in range(len(m.shards)) for b in iter_shard(m, s, 10**6, normalize=False)]
    return {k: torch.cat([b[k] for b in batches]).numpy() for k in batches[0]}


def test_predict_equals_hpc_infer_for_arrays_tensors_and_dataframes(world, tmp_path):
    reg, test = world / "reg", world / "digits" / "test"
    assert isinstance(hpc.infer("digits@production", test, tmp_path / "preds", registry=str(reg), batch_size=64),
                      dict)  # the job's summary
    df = pd.read_parquet(tmp_path / "preds").sort_values("row_id").reset_index(drop=True)
    assert len(df) == 180
    rows = _rows(test)
    m = hpc.load("digits@production", root=reg)
    assert repr(m) == "<hpc.Model digits@1 (classification; inputs x: float32[64])>"
    want = df["prediction"].to_numpy()
    x = rows["x"]
    got = m.predict(x)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    probs = m.predict_proba(x, batch_size=64)  # hpc infer's batches: the same bits
    assert probs.dtype == np.float32 and np.array_equal(probs, np.stack(df["probabilities"].to_numpy()))
    assert np.array_equal(m.predict(torch.from_numpy(x)), want)
    assert np.array_equal(m.predict(pd.DataFrame({"x": list(x)})), want)                      # a column of arrays
    assert np.array_equal(m.predict(pd.DataFrame(x, columns=[f"x_{i}" for i in range(64)])), want)  # x_0..x_63
    assert np.array_equal(m.predict({"x": x.reshape(-1, 8, 8)}), want)                         # any [N, 64] layout
    assert m.predict(x[0]).shape == (1,)                                                       # one row
    with pytest.raises(ValueError, match=r"input 'x' has shape \[3, 32\]; the model expects \[N, 64\] of float32"):
        m.predict(np.zeros((3, 32), np.float32))
    with pytest.raises(ValueError, match="no input field 'x'"):
        m.predict(pd.DataFrame({"a": [1.0]}))


def test_ratings_by_field_names_and_id_columns(world, tmp_path):
    reg, split = world / "reg", world / "ratings" / "test"
    hpc.infer("rec@production", split, tmp_path / "preds", registry=str(reg))
    df = pd.read_parquet(tmp_path / "preds").sort_values("row_id").reset_index(drop=True)
    m = hpc.load("rec@production", root=reg)
    assert m.inputs == ["user", "item"]
    got = m.predict(df[["item", "user"]])  # by name, whatever the column order
    assert got.dtype == np.float32 and np.allclose(got, df["prediction"].to_numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(m.predict(df[["user", "item"]].to_numpy()), got)  # [N, 2]: user, item
    with pytest.raises(ValueError, match="ratings model: use predict"):
        m.predict_proba(df)


def test_load_verifies_and_reads_the_registry_from_the_environment(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_REGISTRY", str(world / "reg"))
    assert hpc.load("digits@production").version == 1
    shutil.copytree(world / "reg" / "digits", tmp_path / "reg" / "digits")
    w = tmp_path / "reg" / "digits" / "1" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: changed"):
        hpc.load("digits@production", root=tmp_path / "reg")
    v = Registry(world / "reg").add_ensemble("both", ["digits@1", "digits@1"])
    with pytest.raises(ValueError, match="no alias points to"):
        hpc.load(f"both@{v}")
    assert hpc.load(f"both@{v}", allow_unpromoted=True).predict(np.zeros((2, 64), np.float32)).shape == (2,)


def test_load_scorer_takes_numpy_like_tensors(world):
    scorer, _ = Registry(world / "reg").load_scorer("digits@production")
    x = _rows(world / "digits" / "val")["x"]
    with torch.inference_mode():
        from_numpy = scorer(scorer.prepare({"x": x}))
        from_torch = scorer(scorer.prepare({"x": torch.from_numpy(x)}))
    assert torch.equal(from_numpy, from_torch)


def test_readme_from_python_example_runs(tmp_path, monkeypatch):
    """The README's notebook-style example, as written, against a registry with a digits_cnn."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## From Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPC_REGISTRY", str(tmp_path / "registry"))
    shard_source("sklearn:digits", "data/digits", split="train=0.8,val=0.1,test=0.1", seed=0,
                 config=WriterConfig(samples_per_shard=500))
    hpc.train("digits_cnn", ["train.epochs=3", "train.progress=false", "registry.name=digits_cnn",
                             "registry.alias=production"])
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert (ns["pred"] == ns["y"]).mean() > 0.8 and ns["pred"].shape == (1797,)
    assert len(pd.read_parquet("preds")) == 180
    summaries = list(Path("runs/digits_softmax").glob("*/summary.json"))  # hpc.train(...)'s run
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["state"] == "completed"
