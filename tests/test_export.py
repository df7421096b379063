"""`hpc registry export`: every family and ensembles as ONNX, TorchScript and torch.export graphs
that take raw rows and equal the registry scorer; int8; the no-hpc snippet; refusals write nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from hpc.cli import main
from hpc.data.normalize import normalizer
from hpc.data.sources import shard_source
from hpc.data.synth import SynthConfig, synth
from hpc.data.writer import WriterConfig
from hpc.models.combine import MetaModel
from hpc.registry import Registry
from hpc.registry import export as export_mod
from hpc.registry.export import read_rows
from hpc.registry.graph import Normalize
from hpc.train import run as train

FAMILIES = {  # registered name -> (data, family, model config, epochs)
    "softmax": ("digits", "softmax", {}, 2),
    "mlp": ("digits", "mlp", {"widths": [128, 64]}, 8),
    "cnn": ("digits", "cnn", {"channels": [4, 8], "head_width": 16}, 2),
    "logistic": ("binary", "logistic", {}, 2),
    "mf": ("ratings", "mf", {"dim": 4}, 2),
    "mlp-regression": ("diabetes", "mlp", {"widths": [16]}, 3),
}
FORMATS = ("onnx", "torchscript", "pt2")
TOL = 1e-5  # the tolerance the export states (hpc.registry.export.TOLERANCE)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch with 1 thread: on a busy 2-core box, 2 OpenMP threads trained these models 30x slower
    (46 s vs 1.5 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models of every family trained in this process and promoted; two ensembles."""
    root = tmp_path_factory.mktemp("export")
    synth(SynthConfig(kind="tabular", samples=400, features=5, classes=2, seed=1), root / "binary")
    synth(SynthConfig(kind="ratings", samples=2000, users=40, items=30, seed=2), root / "ratings")
    for name in ("digits", "diabetes"):
        shard_source(f"sklearn:{name}", root / name, split="train=0.8,val=0.1,test=0.1", seed=0,
                     config=WriterConfig(samples_per_shard=500))
    reg = Registry(root / "reg")
    for name, (data, family, config, epochs) in FAMILIES.items():
        train({"name": name, "out_dir": str(root / "runs"), "data": {"dir": str(root / data), "batch_size": 32},
               "model": {"family": family, "config": config}, "optim": {"name": "adam", "lr": 0.003},
               "train": {"epochs": epochs, "progress": False},
               "registry": {"name": name, "alias": "production", "root": str(reg.root)}})
    reg.add_ensemble("vote", ["softmax@1", "mlp@1", "cnn@1"], "vote")
    torch.manual_seed(0)
    reg.add_ensemble("stack", ["mlp@1", "cnn@1"], "stacking", groups=[[0], [1]], meta=MetaModel("mlp", 20, 10))
    for name in ("vote", "stack"):
        reg.promote(name, 1, "production")
    return {"root": root, "reg": reg, "data": {f: root / d for f, (d, *_) in FAMILIES.items()}}


def export(world, ref: str, out: Path, *args: str) -> int:
    return main(["registry", "export", ref, "--out", str(out), "--registry", str(world["reg"].root), *args])


def load(fmt: str, path: Path):
    """The exported file in its own runtime, nothing from hpc: inputs -> list of numpy outputs."""
    if fmt == "onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda feed: sess.run(None, feed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: deprecated, still shipped
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()

    def run(feed):
        with torch.no_grad():
            out = module(*(torch.from_numpy(v) for v in feed.values()))
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

    return run


def check_graph(world, ref: str, data: Path, out: Path, fmt: str) -> None:
    """Reload the export and run it on test rows (not the validation rows the export checked on)
    with batch sizes 1 and 37 and all; compare with the registry scorer."""
    sig = json.loads((out / "signature.json").read_text())
    scorer, card = world["reg"].load_scorer(ref)
    rows = read_rows(data / "test", card["schema"], 1000)
    fields = [i["name"] for i in sig["inputs"]]
    for spec in sig["inputs"]:  # the raw input the data manifest records
        f = card["schema"]["fields"][spec["name"]]
        assert spec["dtype"] == f["dtype"] and spec["shape"] == ["batch", *f["shape"]]
    run = load(fmt, out / sig["file"])
    with torch.no_grad():
        ref_out = scorer(scorer.prepare({k: torch.from_numpy(v) for k, v in rows.items()})).numpy()
    for n in (1, 37, len(ref_out)):
        got = run({k: rows[k][:n] for k in fields})
        if card["task"] == "classification":
            probs, pred = got
            assert probs.shape == (n, card["schema"]["num_classes"]) and pred.dtype == np.int64
            assert np.abs(probs - ref_out[:n]).max() <= TOL
            assert np.array_equal(pred, ref_out[:n].argmax(1))
        else:
            assert got[0].shape == (n,) and got[0].dtype == np.float32
            assert np.abs(got[0] - ref_out[:n]).max() <= TOL * max(1.0, np.abs(ref_out).max())
    # beside the graph: the card, the signature, the README, and checksums of every file
    assert json.loads((out / "model.json").read_text())["sha256"] == card["sha256"]
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(p.name for p in out.iterdir() if p.name != "SHA256SUMS")
    assert sig["verification"]["max_abs_diff"] <= TOL and sig["verification"]["batches"][1:] == [1, 37]
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    cwd = os.getcwd()
    os.chdir(out)
    try:  # the README's snippet runs as written (test_readme_snippet_runs_with_onnxruntime_only: without hpc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_exports_a_graph_equal_to_the_scorer(world, tmp_path, name, fmt, capsys):
    out = tmp_path / "out"
    assert export(world, f"{name}@production", out, "--format", fmt) == 0
    text = capsys.readouterr().out
    assert re.search(r"OK: max abs difference \S+ <= tolerance 1e-05", text), text
    check_graph(world, f"{name}@production", world["data"][name], out, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["vote", "stack"])
def test_ensembles_export_as_one_graph(world, tmp_path, name, fmt):
    out = tmp_path / "out"
    assert export(world, f"{name}@production", out, "--format", fmt) == 0
    check_graph(world, f"{name}@production", world["data"]["mlp"], out, fmt)
    sig = json.loads((out / "signature.json").read_text())
    assert sig["model"]["kind"] == "ensemble" and [i["name"] for i in sig["inputs"]] == ["x"]


def test_normalization_in_the_graph_is_the_readers(tmp_path):
    """Per feature with a constant feature (std 0 divides by 1), and per channel for images."""
    x = np.random.default_rng(0).normal(size=(5, 3), scale=4).astype(np.float32)
    st = {"mean": [1.0, -2.0, 0.5], "std": [2.0, 0.0, 3.0], "per": "feature"}
    want = normalizer({"x": st}, {"x": (3,)})("x", x.copy())
    assert np.array_equal(Normalize(st, (3,))(torch.from_numpy(x)).numpy(), want)
    img = np.random.default_rng(1).normal(size=(2, 2, 3, 3)).astype(np.float32)
    st = {"mean": [0.1, 0.2], "std": [0.5, 0.0], "per": "channel"}
    want = normalizer({"x": st}, {"x": (2, 3, 3)})("x", img.copy())
    assert np.array_equal(Normalize(st, (2, 3, 3))(torch.from_numpy(img)).numpy(), want)


def test_a_graph_that_differs_exits_1_and_writes_nothing(world, tmp_path, monkeypatch, capsys):
    real = Normalize.forward
    monkeypatch.setattr(Normalize, "forward", lambda self, x: real(self, x) + 1e-3)
    out = tmp_path / "out"
    assert export(world, "softmax@production", out) == 1
    err = capsys.readouterr().err
    assert "differs from the registry scorer" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []  # not the directory, nor a temporary one


def test_unverified_or_unpromoted_versions_are_refused(world, tmp_path, capsys):
    reg = world["reg"]
    bad = Registry(tmp_path / "reg")
    shutil.copytree(reg.root / "softmax", bad.root / "softmax")
    w = bad.root / "softmax" / "1" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    argv = ["registry", "export", "softmax@production", "--out", str(tmp_path / "o1"), "--registry", str(bad.root)]
    assert main(argv) == 2
    assert "model.safetensors: changed" in capsys.readouterr().err
    reg.add_ensemble("unpromoted", ["softmax@1", "mlp@1"], "mean")
    assert export(world, "unpromoted", tmp_path / "o2") == 2
    assert "which no alias points to" in capsys.readouterr().err
    assert export(world, "softmax@1", tmp_path / "o3", "--format", "pt2", "--quantize", "int8") == 2
    assert "--quantize int8 needs --format onnx" in capsys.readouterr().err
    assert not any(tmp_path.glob("o*"))


def test_existing_output_needs_overwrite(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert export(world, "logistic@production", out) == 0
    assert export(world, "logistic@production", out, "--format", "pt2") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert export(world, "logistic@production", out, "--format", "pt2", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "SHA256SUMS", "model.json", "model.pt2",
                                                     "signature.json"]
    assert export(world, "logistic@production", out, "--opset", "17", "--overwrite") == 0
    assert json.loads((out / "signature.json").read_text())["opset"] == 17
    assert [o.version for o in onnx.load(str(out / "model.onnx")).opset_import if o.domain == ""] == [17]
    assert export(world, "logistic@production", out, "--format", "pt2", "--opset", "17", "--overwrite") == 2
    assert "--opset is for --format onnx" in capsys.readouterr().err


def test_int8_on_digits_stays_within_the_stated_drop(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert export(world, "mlp@production", out, "--quantize", "int8") == 0
    text = capsys.readouterr().out
    assert "int8: dynamic" in text and "percentage points (max 1)" in text
    q = json.loads((out / "signature.json").read_text())["int8"]
    assert q["drop"] <= 1.0 and q["fp32_bytes"] / q["bytes"] >= 2.0  # MLP weights: int8 at least 2x smaller
    # the accuracy it reports is the int8 graph's on the test split, recomputed here
    rows = read_rows(world["data"]["mlp"] / "test", world["reg"].card("mlp@1")["schema"], 10**6)
    for name, want in (("model.int8.onnx", q["int8"]), ("model.onnx", q["fp32"])):
        pred = ort.InferenceSession(str(out / name)).run(["prediction"], {"x": rows["x"]})[0]
        assert float((pred == rows["y"]).mean()) == pytest.approx(want) and q["eval_rows"] == len(pred)
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(out / "model.int8.onnx")).graph.node)
    # a CNN: static QDQ quantization calibrated on training rows
    assert export(world, "cnn@production", tmp_path / "cnn", "--quantize", "int8", "--max-drop", "100") == 0
    static = "int8: static (QDQ Conv+MatMul, per channel, calibrated on 512 training rows)"
    assert static in capsys.readouterr().out
    ops = {n.op_type for n in onnx.load(str(tmp_path / "cnn" / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_int8_that_loses_too_much_is_not_written(world, tmp_path, monkeypatch, capsys):
    def zero_weights(src, dst, calibration):  # a "quantizer" that destroys the model
        m = onnx.load(str(src))
        for init in m.graph.initializer:
            if "norm" not in init.name:
                init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
        onnx.save(m, str(dst))
        return "zeroed (test)"

    monkeypatch.setattr(export_mod, "quantize_int8", zero_weights)
    assert export(world, "mlp@production", tmp_path / "out", "--quantize", "int8") == 1
    err = capsys.readouterr().err
    assert re.search(r"a drop of \d+\.\d+ percentage points exceeds --max-drop 1; nothing written", err), err
    assert list(tmp_path.iterdir()) == []


def _site_without_hpc(tmp: Path) -> Path:
    """A site directory holding only numpy and onnxruntime (what the README snippet needs)."""
    site = tmp / "site"
    site.mkdir()
    for mod in (np, ort):
        pkg = Path(mod.__file__).parent
        for p in pkg.parent.iterdir():
            if p.name == pkg.name or p.name == f"{pkg.name}.libs":
                (site / p.name).symlink_to(p)
    return site


@pytest.mark.parametrize("family", ["cnn", "mf"])
def test_readme_snippet_runs_with_onnxruntime_only(world, tmp_path, family):
    out = tmp_path / "out"
    assert export(world, f"{family}@production", out) == 0
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    boot = ("import sys; sys.path[:0] = [sys.argv[1]]\n"
            "for m in ('hpc', 'torch'):\n"
            "    try:\n        __import__(m); raise SystemExit(m + ' is importable')\n"
            "    except ImportError: pass\n"
            "exec(sys.argv[2])")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", boot, str(_site_without_hpc(tmp_path)), code],
                       cwd=out, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pred = np.array(r.stdout.strip().strip("[]").split(), float)
    assert pred.shape == (3,)


def test_bench_export_prints_its_table(world, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "export", "mlp@production", "--registry", str(world["reg"].root), "--rows", "512",
                 "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("torch scorer (hpc infer's computation)", "onnxruntime fp32 graph",
                "onnxruntime int8 graph (dynamic)"):
        assert text.count(row) == (2 if (os.cpu_count() or 1) > 1 else 1), row
    res = json.loads(out.read_text())
    assert res["int8_size_ratio"] >= 2.0 and set(res["rows_per_s"]) >= {"torch/1", "fp32/1", "int8/1"}


def test_without_the_training_data_it_checks_on_rows_from_the_statistics(tmp_path, capsys):
    """A registered CNN on 3x8x8 images whose data directory is gone (per-channel statistics, one
    constant channel): verified on synthetic rows drawn from the training statistics, and says so."""
    from test_registry import make_run_dir

    schema = {"task": "classification", "num_classes": 4,
              "fields": {"x": {"dtype": "float32", "shape": [3, 8, 8]}, "y": {"dtype": "int64", "shape": []}}}
    stats = {"x": {"mean": [0.1, 0.2, 0.3], "std": [1.0, 0.0, 2.0], "per": "channel", "count": 10}}
    reg = Registry(tmp_path / "reg")
    reg.add(make_run_dir(tmp_path / "run", schema=schema, stats=stats, family="cnn",
                         config={"channels": [4], "pool": "avg", "convs_per_block": 2}), "img")
    out = tmp_path / "out"
    assert main(["registry", "export", "img@1", "--allow-unpromoted", "--out", str(out), "--registry",
                 str(reg.root)]) == 0
    assert "verifying against the registry scorer on 256 synthetic rows drawn from the training statistics" in \
        capsys.readouterr().out
    sig = json.loads((out / "signature.json").read_text())
    assert sig["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 8, 8]}]
    assert main(["registry", "export", "img@1", "--allow-unpromoted", "--out", str(tmp_path / "q"), "--registry",
                 str(reg.root), "--quantize", "int8"]) == 2  # no test split to measure int8 on: refused
    assert "no test (or val) split" in capsys.readouterr().err and not (tmp_path / "q").exists()
