"""Model families: registry, shapes, config validation, and the math of the special cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from hpc.models import build_model, list_models, register_model, task_of
from hpc.models.families import default_config, model_config

IMG = {"fields": {"x": {"dtype": "float32", "shape": [1, 8, 8]}, "y": {"dtype": "int64", "shape": []}},
       "num_classes": 10}
FLAT = {"fields": {"x": {"dtype": "float32", "shape": [64]}, "y": {"dtype": "int64", "shape": []}},
        "num_classes": 10}
RATINGS = {"fields": {"user": {"dtype": "int64", "shape": []}, "item": {"dtype": "int64", "shape": []},
                      "rating": {"dtype": "float32", "shape": []}}, "num_users": 7, "num_items": 5,
           "rating_mean": 3.5}


def test_builtin_families_registered_with_tasks():
    assert {"logistic", "softmax", "mlp", "cnn", "mf"} <= set(list_models())
    assert task_of("cnn") == "classification" and task_of("mf") == "ratings"


@pytest.mark.parametrize("family,config", [
    ("softmax", {}), ("mlp", {"widths": [16, 8], "norm": "batch", "dropout": 0.2}),
    ("mlp", {"widths": [16], "norm": "layer", "activation": "gelu"}),
    ("cnn", {"channels": [4, 8], "convs_per_block": 2}), ("cnn", {"batch_norm": False, "head_width": 0}),
    ("cnn", {"channels": [4, 4, 4], "pool": "max"}), ("cnn", {"pool": "avg", "dropout": 0.1}),
])
@pytest.mark.parametrize("schema", [IMG, FLAT], ids=["chw", "flat"])
def test_classifiers_give_logits_and_gradients(family, config, schema):
    torch.manual_seed(0)
    model = build_model(family, config, schema)
    x = torch.randn(6, *schema["fields"]["x"]["shape"])
    out = model({"x": x})
    assert out.shape == (6, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_logistic_is_binary_cross_entropy():
    schema = {"fields": {"x": {"dtype": "float32", "shape": [5]}}, "num_classes": 2}
    torch.manual_seed(1)
    model = build_model("logistic", {}, schema)
    x, y = torch.randn(9, 5), torch.randint(0, 2, (9,))
    logits = model({"x": x})
    z = model.linear(x)[:, 0]
    ce = nn.functional.cross_entropy(logits, y)
    bce = nn.functional.binary_cross_entropy_with_logits(z, y.float())
    torch.testing.assert_close(ce, bce)
    with pytest.raises(ValueError, match="needs 2 classes"):
        build_model("logistic", {}, FLAT)


def test_mf_prediction_and_losses():
    torch.manual_seed(2)
    model = build_model("mf", {"dim": 3}, RATINGS)
    u, i = torch.tensor([0, 6, 3]), torch.tensor([4, 0, 2])
    batch = {"user": u, "item": i, "rating": torch.tensor([1.0, 4.0, 5.0])}
    pred = model(batch)
    manual = (model.mu + model.user_bias.weight[u, 0] + model.item_bias.weight[i, 0]
              + (model.user_emb.weight[u] * model.item_emb.weight[i]).sum(1))
    torch.testing.assert_close(pred, manual)
    assert float(model.mu.detach()) == 3.5  # initialised from the manifest's rating mean
    torch.testing.assert_close(model.loss(pred, batch), (pred - batch["rating"]) ** 2)
    bce = build_model("mf", {"loss": "bce"}, RATINGS)
    assert bce.loss(bce(batch), {**batch, "rating": torch.tensor([0.0, 1.0, 1.0])}).shape == (3,)


@pytest.mark.parametrize("family,config,match", [
    ("cnn", {"chanels": [8]}, r"unknown key 'chanels'; did you mean 'channels'\? valid keys: batch_norm, channels"),
    ("mlp", {"dropout": 1.5}, r"dropout: must be in \[0, 1\)"),
    ("mlp", {"widths": "64"}, r"widths: expected list of int"),
    ("mlp", {"activation": "swish"}, r"'swish' is not one of 'relu', 'gelu', 'gelu_tanh'"),
    ("mf", {"dim": 0}, r"dim: must be > 0"),
    ("nope", {}, r"unknown model family 'nope'; registered: cnn, "),
])
def test_bad_model_config_names_key_and_valid_values(family, config, match):
    with pytest.raises(ValueError, match=match):
        model_config(family, config)


def test_wrong_data_for_model_is_a_clear_error():
    with pytest.raises(ValueError, match="num_users"):
        build_model("mf", {}, FLAT)
    with pytest.raises(ValueError, match="no field 'pixels'"):
        build_model("softmax", {"input": "pixels"}, FLAT)
    bad = {"fields": {"x": {"dtype": "float32", "shape": [10]}}, "num_classes": 3}
    with pytest.raises(ValueError, match="flat square image"):
        build_model("cnn", {}, bad)


def test_user_model_registers_without_touching_the_trainer():
    @dataclass
    class TinyConfig:
        scale: float = 1.0

    @register_model("test_tiny", config=TinyConfig, task="regression")
    def build(cfg, schema):
        return nn.Linear(schema["fields"]["x"]["shape"][0], 1)

    assert "test_tiny" in list_models() and task_of("test_tiny") == "regression"
    assert default_config("test_tiny") == {"scale": 1.0}
    m = build_model("test_tiny", {"scale": 2}, FLAT)
    assert m.family == "test_tiny" and m.task == "regression"
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_tiny", config=TinyConfig)(lambda c, s: None)
