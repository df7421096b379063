"""`hpc bench allreduce`: the gradient-set shape (pure) and one tiny real run (no timing asserted)."""

import json

import pytest

from hpc.bench.allreduce import model_like_sizes
from hpc.cli import main


def test_model_like_sizes():
    sizes = model_like_sizes(100 << 20, 200)
    assert len(sizes) == 200 and sum(sizes) * 4 == 100 << 20 and min(sizes) >= 1
    weights, biases = sizes[0::2], sizes[1::2]
    assert min(weights) > max(biases)  # weight matrices dwarf biases, as in a real model
    assert model_like_sizes(100 << 20, 200) == sizes  # deterministic: every rank builds the same set
    with pytest.raises(ValueError, match="--tensors"):
        model_like_sizes(8, 200)


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "allreduce", "--ranks", "two"]) == 2
    assert "--ranks 'two'" in capsys.readouterr().err


@pytest.mark.mpi
def test_tiny_run_writes_ratios(tmp_path, capsys):
    out = tmp_path / "ar.json"
    assert main(["bench", "allreduce", "--ranks", "2", "--mb", "2", "--tensors", "20",
                 "--bucket-mb", "0.5,1", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sync_vs_raw" in printed and "bucket size sweep" in printed
    res = json.loads(out.read_text())["results"][0]
    assert res["ranks"] == 2 and set(res["ratios"]) == {"sync_vs_raw", "sync_vs_per_tensor", "sync_vs_horovod"}
    assert res["buckets"]["0.5"] > res["buckets"]["1"] >= 2
    assert all(v > 0 for v in res["ms"].values())
