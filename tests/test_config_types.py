"""Config values are parsed by the type their field declares, in YAML files and key=value overrides
alike (hpc.util.typed): ``1e-3`` is a number for a float field, ``007`` and ``2024-01-01`` stay
text for a str field, ``no`` is false only for a bool field; quoted values are always strings."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any, Literal, Union

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc.ensemble.spec import EnsembleSpec, load_spec
from hpc.util.typed import _coerce, load_yaml, resolve_untyped
from hpc.train.config import CONFIG_DIR, TrainConfig, dump_yaml, load_config, parse_override

BASE = {"data": {"dir": "d"}, "model": {"family": "mlp"}}


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = cfg[k] if isinstance(cfg, dict) else getattr(cfg, k)
    return cfg


# The literals from the issue: what YAML 1.1 (yaml.safe_load) read as strings, dates or booleans.
LITERALS = [
    ("optim.lr", "1e-3", 0.001),
    ("optim.eps", "1e-8", 1e-8),
    ("optim.lr", "5E-4", 0.0005),
    ("optim.lr", ".5", 0.5),
    ("optim.lr", "1_000", 1000.0),
    ("optim.lr", "3", 3.0),
    ("data.batch_size", "1_000", 1000),
    ("data.batch_size", "007", 7),
    ("run_id", "1", "1"),
    ("run_id", "007", "007"),
    ("run_id", "2024-01-01", "2024-01-01"),
    ("run_id", "null", None),
    ("run_id", "~", None),
    ("run_id", "'null'", "null"),
    ("name", "no", "no"),
    ("name", "1e-3", "1e-3"),
    ("name", "true", "true"),
    ("train.progress", "no", False),
    ("train.progress", "Yes", True),
    ("train.progress", "TRUE", True),
    ("train.progress", "0", False),
    ("train.progress", "1", True),
    ("train.precision", "bf16", "bf16"),
    ("optim.betas", "[0.9,1e-3]", [0.9, 0.001]),
    ("optim.betas", "[.5, 5E-1]", [0.5, 0.5]),
    ("optim.fused", "auto", "auto"),
    ("optim.fused", "cupy", "cupy"),
    ("optim.fused", "yes", True),
    ("optim.fused", "false", False),
    ("data.augment", "flip,crop=2", "flip,crop=2"),
    ("data.augment", "{flip: true, noise_std: 1e-2}", {"flip": True, "noise_std": 0.01}),
    ("data.augment", "null", None),
    ("model.config.dropout", "1e-1", 0.1),
    ("model.config.widths", "[8, 1_0]", [8, 10]),
    ("model.config.input", "007", "007"),
    ("model.config", "null", {}),
    ("registry.alias", "~", None),
    ("registry.alias", "2024-01-01", "2024-01-01"),
]


@pytest.mark.parametrize("key,text,want", LITERALS)
def test_literals_in_overrides_and_in_yaml_files(tmp_path, key, text, want):
    extra = ["registry.name=m"] if key.startswith("registry.") else []
    cfg = load_config(BASE, [f"{key}={text}", *extra])
    got = _get(cfg, key)
    assert got == want and type(got) is type(want)
    # the same text in a YAML file (block mappings, the value as the user wrote it)
    data: dict = {"data": {"dir": "d"}, "model": {"family": "mlp"}, **({"registry": {"name": "m"}} if extra else {})}
    d, keys = data, key.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = "__TEXT__"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data).replace("__TEXT__", text))
    assert f": {text}\n" in p.read_text()
    got = _get(load_config(p), key)
    assert got == want and type(got) is type(want)


def test_yaml_block_lists_and_a_negative_exponent(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: no\nrun_id: 2024-01-01\ndata: {dir: d}\nmodel:\n  family: cnn\n  config:\n"
                 "    channels:\n    - 8\n    - 1_6\n    dropout: 5E-2\noptim:\n  betas:\n  - .9\n  - 9.99e-1\n"
                 "  lr: 1e-3\n  eps: 1e-10\n")
    cfg = load_config(p)
    assert (cfg.name, cfg.run_id, cfg.optim.lr, cfg.optim.eps) == ("no", "2024-01-01", 0.001, 1e-10)
    assert cfg.optim.betas == [0.9, 0.999] and cfg.model.config == {"channels": [8, 16], "dropout": 0.05}
    # the value really was parsed as -2500.0: the constraint reports the number
    with pytest.raises(ValueError, match=r"config\.optim\.lr: must be > 0, got -2500\.0"):
        load_config(BASE, ["optim.lr=-2.5e+3"])


@pytest.mark.parametrize("override,match", [
    (["optim.lr='1e-3'"], r"optim\.lr: expected a number, got the quoted string '1e-3' \(quoted values are strings"),
    (['data.batch_size="8"'], r"data\.batch_size: expected an integer, got the quoted string '8'"),
    (["train.progress=maybe"], r"train\.progress: expected true or false \(or yes/no, 1/0\), got 'maybe'"),
    (["train.progress=on"], r"expected true or false"),          # YAML 1.1's on/off are not booleans here
    (["data.batch_size=1.5"], r"data\.batch_size: expected an integer, got '1\.5'"),
    (["optim.betas=0.9"], r"optim\.betas: expected list of float \(written \[a, b\]\), got '0\.9'"),
    (["optim.fused=2"], r"optim\.fused: '2' is not a valid value; expected bool \| 'auto' \| 'cupy' \| 'torch'"),
    (["train.precision=no"], r"'no' is not one of 'fp32', 'bf16', 'fp16'"),
])
def test_wrong_values_name_the_key_and_what_is_valid(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(BASE, override)


def test_quoted_values_stay_strings_and_untyped_values_follow_yaml_1_2():
    cfg = load_config(BASE, ["name='1e-3'", 'run_id="007"', "data.sample_weights={kind: bootstrap, seed: 0x1F}"])
    assert cfg.name == "1e-3" and cfg.run_id == "007" and cfg.data.sample_weights == {"kind": "bootstrap", "seed": 31}
    # no declared type: the YAML 1.2 core schema (1e-3 a float, yes/no/on text, 007 the integer 7)
    assert resolve_untyped(load_yaml("{a: 1e-3, b: yes, c: 007, d: ~, e: [true, .inf], f: '1'}")) == \
        {"a": 0.001, "b": "yes", "c": 7, "d": None, "e": [True, float("inf")], "f": "1"}


def test_the_ensemble_spec_reads_values_the_same_way(tmp_path):
    (tmp_path / "base.yaml").write_text("name: x\n")
    p = tmp_path / "ens.yaml"
    p.write_text("name: 2024-01-01\nbase: base.yaml\nmethod: boosting\nseed: 1_0\n"
                 "boosting: {rounds: 3, shrinkage: 5e-1}\noverrides: [optim.lr=1e-3]\n"
                 "registry: {alias: no}\n")
    s = load_spec(p)
    assert (s.name, s.seed, s.boosting.shrinkage, s.registry.alias) == ("2024-01-01", 10, 0.5, "no")
    assert s.overrides == ["optim.lr=1e-3"] and type(s.overrides[0]) is str
    p.write_text("name: e\nbase: base.yaml\nmethod: stacking\nstacking: {meta: {lr: 1e-2, weight_decay: 0}}\n")
    assert load_spec(p).stacking.meta.lr == 0.01


# -- did you mean ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,overrides,match", [
    ("optim: {lrr: 0.1}\n", [], r"config\.optim: unknown key 'lrr'; did you mean 'lr'\? valid keys: betas, "),
    ("", ["optim.lrr=0.1"], r"config\.optim: unknown key 'lrr' in override 'optim\.lrr=0\.1'; did you mean optim\.lr\? "),
    ("", ["lr=0.1"], r"config: unknown key 'lr' in override 'lr=0\.1'; did you mean optim\.lr\? valid keys: checkpoint"),
    ("", ["train.epoch=2"], r"did you mean train\.epochs\?"),
    ("", ["registry.aliass=x"], r"config\.registry: unknown key 'aliass' in override .*did you mean registry\.alias\?"),
    ("epochs: 3\n", [], r"config: unknown key 'epochs'; did you mean train\.epochs\? valid keys:"),
    ("model: {family: cnn, config: {chanels: [8]}}\n", [],
     r"config\.model\.config: unknown key 'chanels'; did you mean 'channels'\? valid keys: batch_norm, channels"),
    ("optim: {zzz: 1, lrr: 2}\n", [], r"unknown keys 'lrr', 'zzz'; did you mean 'lr' for 'lrr'\? valid keys"),
    ("optim: {zzz: 1}\n", [], r"config\.optim: unknown key 'zzz'; valid keys: betas"),
])
def test_unknown_keys_suggest_the_closest_valid_one(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text("data: {dir: d}\n" + ("" if "model:" in text else "model: {family: mlp}\n") + text)
    with pytest.raises(ValueError, match=match) as e:
        load_config(p, overrides)
    assert str(p) in str(e.value)


# -- the property: every field of every config dataclass ------------------------------------------

def _dataclasses() -> list[type]:
    """TrainConfig, the ensemble spec, every registered model family's config, and every dataclass
    reachable from them through their fields."""
    import hpc.ensemble.hierarchical  # noqa: F401 - registers the `hierarchical` family
    from hpc.models.families import _entry, list_models

    todo = [TrainConfig, EnsembleSpec, *(_entry(f).config for f in list_models())]
    seen: list[type] = []
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        stack = list(typing.get_type_hints(cls).values())
        while stack:
            tp = stack.pop()
            if dataclasses.is_dataclass(tp):
                todo.append(tp)
            stack.extend(typing.get_args(tp))
    return seen


CLASSES = _dataclasses()
FIELDS = [(cls, f.name) for cls in CLASSES for f in dataclasses.fields(cls) if f.init]
NULL_WORDS = ("", "~", "null", "Null", "NULL")
# Text that YAML 1.1 or 1.2 would read as another type: as a str it must stay that exact string.
TRICKY = ["no", "yes", "on", "off", "true", "False", "007", "1", "-5", "1e-3", "5E-4", ".5", "1_000",
          "0x1F", "0o17", "2024-01-01", "2024-01-01T10:00:00", "12:30", ".inf", "nan", "1.0", "+1", "~", "null"]
PLAIN = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_./+-]{0,12}", fullmatch=True)
BOOL_WORDS = {True: ["true", "True", "TRUE", "yes", "Yes", "1"], False: ["false", "FALSE", "no", "No", "0"]}
CORE_BOOL_WORDS = {True: ["true", "True", "TRUE"], False: ["false", "False", "FALSE"]}   # YAML 1.2


def _strategy(tp, typed: bool = True):
    """(value, text) pairs for a value of type ``tp`` and the text a user types for it; None where
    the field is another dataclass (its own fields are tested) or Any (typed by its owner)."""
    origin = typing.get_origin(tp)
    if tp is Any or dataclasses.is_dataclass(tp):
        return None
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        # a str beside None must quote the null words (`'null'`): unquoted they mean None
        parts = [_str_strategy(optional) if a is str else _strategy(a, typed) for a in args if a is not type(None)]
        parts = [p for p in parts if p is not None]
        if optional:
            parts.append(st.tuples(st.none(), st.sampled_from(["null", "~", "Null", "NULL"])))
        return st.one_of(parts) if parts else None
    if tp is type(None):
        return st.tuples(st.none(), st.just("null"))
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp)).map(lambda c: (c, c))
    if tp is bool:
        words = BOOL_WORDS if typed else CORE_BOOL_WORDS
        return st.booleans().flatmap(lambda b: st.sampled_from(words[b]).map(lambda w: (b, w)))
    if tp is int:
        return st.integers(-10**12, 10**12).map(lambda i: (i, str(i)))
    if tp is float:
        # floats by repr, as Python prints them (1e-05, inf, -0.0)
        return st.floats(allow_nan=False, allow_infinity=typed).map(lambda x: (x, repr(x)))
    if tp is str:
        return _str_strategy(False, typed)
    if origin in (list, tuple):
        (arg,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = _strategy(arg, typed)
        if item is None:
            return None
        return st.lists(item, max_size=4).map(lambda xs: ([v for v, _ in xs], "[" + ",".join(t for _, t in xs) + "]"))
    if origin is dict or tp is dict:
        # a free mapping: no declared types below it, so its strings that YAML 1.2 reads as another
        # type must be quoted by the user (and are, here)
        leaf = st.one_of(_strategy(int, False), _strategy(float, False), _strategy(bool, False),
                         _str_strategy(False, typed=False), st.tuples(st.none(), st.just("null")))
        return st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), leaf, max_size=3).map(
            lambda d: ({k: v for k, (v, _) in d.items()}, "{" + ", ".join(f"{k}: {t}" for k, (_, t) in d.items()) + "}"))
    raise AssertionError(f"no strategy for {tp!r}")


def _str_strategy(optional: bool, typed: bool = True):
    def text(s: str) -> str:
        ambiguous = (optional and s in NULL_WORDS) or (not typed and resolve_untyped(load_yaml(s)) != s)
        return json.dumps(s) if ambiguous else s   # quoted (a YAML double-quoted scalar) only where it must be
    return st.one_of(st.sampled_from(TRICKY), PLAIN).map(lambda s: (s, text(s)))


def _block(text: str, value) -> str | None:
    """The YAML block-list form of a non-empty list (its items' texts hold no comma), else None."""
    if not isinstance(value, list) or not value:
        return None
    return "\n" + "".join(f"  - {t}\n" for t in text[1:-1].split(","))


def _same(got, want) -> bool:
    if isinstance(want, float):
        return type(got) is float and repr(got) == repr(want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def test_the_property_covers_every_config_dataclass():
    from hpc.ensemble.hierarchical import HierarchicalConfig
    from hpc.ensemble.spec import BaggingParams, MemberSpec, MetaParams
    from hpc.models.cnn import CNNConfig
    from hpc.train.config import MonitorSection, OptimConfig, RegistrySection

    for cls in (OptimConfig, MonitorSection, RegistrySection, CNNConfig, HierarchicalConfig, BaggingParams,
                MetaParams, MemberSpec):
        assert cls in CLASSES, cls
    assert sum(_strategy(typing.get_type_hints(c)[n]) is not None for c, n in FIELDS) >= 100


@pytest.mark.parametrize("cls,name", FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FIELDS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_value_typed_as_text_reads_back_as_itself(cls, name, data):
    tp = typing.get_type_hints(cls)[name]
    strategy = _strategy(tp)
    if strategy is None:
        return  # a section (its own fields are parametrized here) or Any (typed by the family)
    value, text = data.draw(strategy)
    where = f"{cls.__name__}.{name}"
    # as an override: key=value
    _, raw = parse_override(f"{name}={text}")
    assert _same(_coerce(raw, tp, where), value), (text, raw)
    # in a YAML file: `key: value`, and a list also as a block list
    assert _same(_coerce(load_yaml(f"{name}: {text}\n")[name], tp, where), value), text
    block = _block(text, value)
    if block is not None:
        assert _same(_coerce(load_yaml(f"{name}:{block}")[name], tp, where), value), block


# -- hash, saved files, --print-config, --help ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("ensemble_")
                                        or p.stem.endswith("_base")))
def test_config_hash_is_what_yaml_1_1_gave_for_the_shipped_configs(name):
    # The shipped configs hold no literal YAML 1.1 misread, so yaml.safe_load's values are what the
    # loader before this change hashed: a run checkpointed then resumes without a hash warning.
    path = CONFIG_DIR / f"{name}.yaml"
    old = load_config(yaml.safe_load(path.read_text()))
    assert load_config(path).hash() == old.hash() and load_config(path).to_dict() == old.to_dict()


def test_integer_text_for_a_model_float_field_stays_an_int_in_the_hash():
    a = load_config(BASE, ["model.config.dropout=0", "optim.lr=1e-1"])
    b = load_config({"data": {"dir": "d"}, "model": {"family": "mlp", "config": {"dropout": 0}}, "optim": {"lr": 0.1}})
    assert a.model.config == {"dropout": 0} and type(a.model.config["dropout"]) is int
    assert a.hash() == b.hash() and a.to_dict() == b.to_dict()


def test_print_config_prints_the_resolved_config_and_exits_0(tmp_path, capsys, monkeypatch):
    from hpc.cli import main

    monkeypatch.chdir(tmp_path)
    overrides = ["optim.lr=1e-3", "run_id=2024-01-01", "name=1e-3", "model.config.dropout=5E-2", "data.dir=no"]
    assert main(["train", "digits_cnn", overrides[0], "--print-config", *overrides[1:]]) == 0
    out = capsys.readouterr().out
    want = load_config("digits_cnn", overrides)
    assert out == dump_yaml(want)                         # what the run directory's config.yaml holds
    assert yaml.safe_load(out) == want.to_dict()          # real numbers and strings, for any YAML reader
    (tmp_path / "printed.yaml").write_text(out)
    assert load_config(tmp_path / "printed.yaml").to_dict() == want.to_dict()
    assert load_config(tmp_path / "printed.yaml").hash() == want.hash()
    assert not (tmp_path / "runs").exists()               # nothing trained
    # before CONFIG, and with --nproc (nothing is launched)
    assert main(["train", "--print-config", "digits_cnn"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_config("digits_cnn").to_dict()
    assert main(["train", "digits_cnn", "--nproc", "2", "--print-config"]) == 0
    # a bad override is still exit 2
    assert main(["train", "digits_cnn", "--print-config", "optim.lrr=1"]) == 2
    assert "did you mean optim.lr?" in capsys.readouterr().err


def test_help_shows_optional_overrides_and_every_exit_code(capsys):
    from hpc.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
    from hpc.cli.train import EXIT
    from hpc.instrument.watchdog import HANG_EXIT_CODE
    from hpc.train.preempt import EXIT_PREEMPTED

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n")[0]
    assert "[key=value ...]" in usage and "CONFIG" in usage and "--print-config" in usage
    for code in {*EXIT.values(), EXIT_USAGE, EXIT_PREEMPTED, HANG_EXIT_CODE, EXIT_INTERRUPTED}:
        assert re.search(rf"^  {code} +\S", out, re.M), (code, out)
    assert "watchdog" in out and "preempted" in out
    with pytest.raises(SystemExit) as e:
        main(["train"])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_USAGE and "required: CONFIG\n" in err   # the overrides are optional


def test_saved_config_and_summary_hold_real_numbers(tmp_path):
    from hpc.data import SynthConfig, synth
    from hpc.train import run

    synth(SynthConfig(kind="tabular", samples=120, features=4, classes=3, seed=1), tmp_path / "d",
          split="train=0.8,val=0.2")
    cfg = {"name": "types", "out_dir": str(tmp_path / "runs"), "data": {"dir": str(tmp_path / "d"), "batch_size": 16},
           "model": {"family": "mlp"}, "train": {"epochs": 1, "progress": False}, "monitor": {"heartbeat_s": 0}}
    overrides = ["optim.lr=5e-2", "model.config.widths=[8]", "model.config.dropout=0", "run_id=007",
                 "optim.weight_decay=1e-4", "optim.name=adamw"]
    s = run(cfg, overrides)
    assert s["state"] == "completed"
    run_dir = tmp_path / "runs" / "types" / "007"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.05 and saved["optim"]["weight_decay"] == 0.0001 and saved["run_id"] == "007"
    assert saved["model"]["config"] == {"widths": [8], "dropout": 0}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"]["config"] == {"widths": [8], "dropout": 0}
    assert summary["config_hash"] == load_config(cfg, overrides).hash() == load_config(run_dir / "config.yaml").hash()
