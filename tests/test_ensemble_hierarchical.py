"""Hierarchical models: a registered CNN's feature layer feeding a classifier head, frozen or fine-tuned."""

import pytest
import torch
from safetensors.torch import load_file

from hpc.data.reader import iter_shard
from hpc.data.sources import shard_source
from hpc.data.writer import WriterConfig
from hpc.registry import Registry
from hpc.train import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hier")
    shard_source("sklearn:digits", root / "digits", split="train=0.8,val=0.1,test=0.1", seed=0,
                 config=WriterConfig(samples_per_shard=500))
    base = {"name": "cnn", "out_dir": str(root / "runs"), "data": {"dir": str(root / "digits"), "batch_size": 64},
            "model": {"family": "cnn", "config": {"channels": [4, 8], "head_width": 16}},
            "optim": {"name": "adam", "lr": 0.01}, "train": {"epochs": 1, "progress": False}}
    s = run(base)
    reg = Registry(root / "reg")
    v = reg.add(s["run_dir"], "cnn")
    return root, base, reg, f"cnn@{v}"


def _hier(setup, name, freeze):
    root, base, reg, ref = setup
    cfg = dict(base, name=name, imports=["hpc.ensemble.hierarchical"],
               model={"family": "hierarchical", "config": {
                   "features_from": f"{ref}:features", "freeze": freeze, "registry": str(root / "reg"),
                   "head": {"family": "mlp", "config": {"widths": [16]}}}})
    s = run(cfg)
    return s, load_file(f"{s['run_dir']}/models/last.safetensors")


def test_frozen_extractor_keeps_registered_weights(setup):
    root, base, reg, ref = setup
    s, w = _hier(setup, "hier-frozen", True)
    cnn, _ = reg.load(ref, allow_unpromoted=True)
    for k, v in cnn.features.state_dict().items():
        torch.testing.assert_close(w[f"extractor.features.{k}"], v, rtol=0, atol=0)
    assert s["metrics"]["test"]["accuracy"] > 0.3  # the head learned from the features
    # registered, it loads through the registry (the extractor rebuilt from its own entry) and
    # scores like the trained module
    v = reg.add(s["run_dir"], "hier", source="last")
    model, card = reg.load(f"hier@{v}", allow_unpromoted=True)
    assert card["model"]["config"]["features_from"] == f"{ref}:features"
    b = next(iter_shard(root / "digits" / "test", 0, 1000))
    with torch.no_grad():
        out = model(b)
    assert out.shape == (len(b["y"]), 10)
    head_w = {k[5:]: t for k, t in w.items() if k.startswith("head.")}
    for k, t in model.head.state_dict().items():
        torch.testing.assert_close(t, head_w[k])


def test_fine_tuned_extractor_changes(setup):
    _, _, reg, ref = setup
    _, w = _hier(setup, "hier-tuned", False)
    cnn, _ = reg.load(ref, allow_unpromoted=True)
    k, v = next(iter(cnn.features.state_dict().items()))
    assert not torch.equal(w[f"extractor.features.{k}"], v)


def test_bad_layer_and_ref(setup):
    root, base, reg, ref = setup
    from hpc.models.families import build_model
    import hpc.ensemble.hierarchical  # noqa: F401

    schema = {"task": "classification", "num_classes": 10, "fields": {"x": {"dtype": "float32", "shape": [64]},
                                                                      "y": {"dtype": "int64", "shape": []}}}
    with pytest.raises(ValueError, match="no module 'nope'.*features"):
        build_model("hierarchical", {"features_from": f"{ref}:nope", "registry": str(root / "reg")}, schema)
    with pytest.raises(ValueError, match="NAME@VERSION:LAYER"):
        build_model("hierarchical", {"features_from": "cnn"}, schema)


def test_registered_hierarchical_scores_in_a_fresh_hpc_infer(setup, tmp_path):
    """`hpc infer` in a new process: the registry imports the card's training_config.imports
    (the hierarchical family) and rebuilds the extractor from its own verified entry."""
    import subprocess
    import sys

    import pandas as pd

    root, base, reg, ref = setup
    s, _ = _hier(setup, "hier-infer", True)
    v = reg.add(s["run_dir"], "hier-infer", source="last")
    out = tmp_path / "preds"
    r = subprocess.run([sys.executable, "-m", "hpc", "infer", "--model", f"hier-infer@{v}", "--registry",
                        str(reg.root), "--input", str(root / "digits" / "test"), "--output", str(out),
                        "--allow-unpromoted"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_parquet(out).sort_values(["shard", "index"])
    assert (out / "_SUCCESS").is_file()
    scorer, _ = reg.load_scorer(f"hier-infer@{v}", allow_unpromoted=True)
    b = next(iter_shard(root / "digits" / "test", 0, 1000, normalize=False))
    with torch.no_grad():
        expect = scorer(scorer.prepare(b)).argmax(1).numpy()
    assert len(df) == len(expect) and (df["prediction"].to_numpy() == expect).all()
