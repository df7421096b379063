"""ensemble.yaml validation: clear errors naming the file, the key and what is valid."""

import pytest
import yaml

from hpc.ensemble.spec import load_spec


def _write(tmp_path, data):
    p = tmp_path / "ens.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_base_relative_to_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("name: x\n")
    s = load_spec(_write(tmp_path, {"name": "e1", "base": "base.yaml", "method": "boosting"}))
    assert s.boosting.rounds == 5 and s.bagging is None and s.size == 5
    assert s.base_path() == str(tmp_path / "base.yaml")
    s = load_spec({"name": "e2", "base": "b", "method": "stacking",
                   "members": [{"overrides": ["a=1"]}, {}], "overrides": ["z=0"]})
    assert s.size == 2 and s.stacking.folds == 5 and s.member_overrides(0) == ["z=0", "a=1"]
    assert s.member_overrides(1) == ["z=0"]


@pytest.mark.parametrize("data,match", [
    ({"base": "b"}, r"ensemble\.name"),
    ({"name": "a/b", "base": "b"}, r"ensemble\.name"),
    ({"name": "e"}, r"ensemble\.base: is required"),
    ({"name": "e", "base": "b", "method": "voting"}, r"'bagging', 'boosting', 'stacking'"),
    ({"name": "e", "base": "b", "method": "bagging", "boosting": {"rounds": 3}},
     r"ensemble\.boosting: is given but method is bagging"),
    ({"name": "e", "base": "b", "bagging": {"members": 1}}, r"bagging\.members: must be >= 2"),
    ({"name": "e", "base": "b", "bagging": {"combine": "median"}}, r"'mean', 'vote'"),
    ({"name": "e", "base": "b", "bagging": {"members": 3}, "members": [{}, {}]},
     r"members: has 2 entries; give none or one per member \(3\)"),
    ({"name": "e", "base": "b", "method": "boosting", "boosting": {"shrinkage": 0}}, r"shrinkage"),
    ({"name": "e", "base": "b", "method": "stacking", "stacking": {"meta": {"kind": "tree"}}},
     r"'softmax', 'linear', 'mlp'"),
    ({"name": "e", "base": "b", "bagging": {"memberz": 3}}, r"unknown key 'memberz'; did you mean 'members'\? valid keys: bootstrap, combine, members"),
])
def test_errors_name_the_field(tmp_path, data, match):
    p = _write(tmp_path, data)
    with pytest.raises(ValueError, match=match) as e:
        load_spec(p)
    assert str(p) in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_spec(bad)


def test_cli_exit_2_on_bad_spec(tmp_path, capsys):
    from hpc.cli import main

    p = _write(tmp_path, {"name": "e", "base": "b", "bagging": {"members": 1}})
    assert main(["ensemble", "train", str(p)]) == 2
    assert "bagging.members: must be >= 2" in capsys.readouterr().err
    assert main(["ensemble", "train", "no_such_spec"]) == 2
    assert "ensemble_digits_bagging" in capsys.readouterr().err  # lists the shipped specs


def test_shipped_specs_validate():
    from hpc.cli.ensemble import resolve_spec

    for name in ("ensemble_digits_bagging", "ensemble_digits_boosting", "ensemble_digits_stacking",
                 "ensemble_ratings_bagging"):
        s = load_spec(resolve_spec(name))
        assert s.base_path().endswith("_base.yaml")
