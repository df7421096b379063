"""Issue 17, attacks that must fail: code stored in a registry version or the working directory is
never imported by accident, names cannot leave their directory, sbatch values cannot inject lines,
hostile YAML is refused before it costs memory."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from hpc.dist.spawn import launch_env, mpiexec_command
from hpc.ensemble.spec import load_spec
from hpc.launch.sbatch import SlurmResources, render_sbatch
from hpc.registry.layout import parse_ref
from hpc.registry.scorers import import_card_plugin
from hpc.train.config import apply_overrides, load_config
from hpc.util.names import check_name, is_name
from hpc.util.typed import MAX_CONFIG_BYTES, load_yaml, read_yaml_mapping

BASE = {"data": {"dir": "d"}, "model": {"family": "softmax"}}
PLUGIN = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


# -- item 5: code inside a registry version / the working directory -------------------------------
def test_spawned_ranks_do_not_run_code_from_the_working_directory(tmp_path):
    """`python -m hpc` puts the working directory first on sys.path: an `hpc/` (or `plugin.py`) there
    would be run instead of the installed one. The ranks' command line must not."""
    marker = tmp_path / "ran"
    (tmp_path / "hpc").mkdir()
    (tmp_path / "hpc" / "__init__.py").write_text("")
    (tmp_path / "hpc" / "__main__.py").write_text(PLUGIN.format(marker=str(marker)))
    cmd = mpiexec_command(1, ["--help"], "mpiexec", cores=1)
    rank_cmd = cmd[cmd.index(sys.executable):]   # what each rank runs
    env = launch_env(1, 1)
    env.pop("PYTHONPATH", None)
    r = subprocess.run(rank_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), "a rank ran hpc/__main__.py from its working directory"
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-2000:]


@pytest.mark.parametrize("where", ["version", "cwd"])
def test_card_named_plugin_inside_the_registry_or_cwd_is_not_imported(tmp_path, monkeypatch, where):
    reg = tmp_path / "registry"
    vdir = reg / "m" / "1"
    vdir.mkdir(parents=True)
    marker = tmp_path / "ran"
    home = vdir if where == "version" else tmp_path
    (home / "evil_plugin_17.py").write_text(PLUGIN.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(home))       # as `python -m` (cwd) or a planted path would
    monkeypatch.delenv("HPC_TRUST_PLUGINS", raising=False)
    sys.modules.pop("evil_plugin_17", None)
    with pytest.raises(ValueError, match=r"not an installed module .*--trust-plugin evil_plugin_17"):
        import_card_plugin("evil_plugin_17", reg, vdir, "evil")
    assert not marker.exists() and "evil_plugin_17" not in sys.modules
    monkeypatch.setenv("HPC_TRUST_PLUGINS", "evil_plugin_17")      # explicit --trust-plugin: runs
    import_card_plugin("evil_plugin_17", reg, vdir, "evil")
    assert marker.read_text() == "ran"
    sys.modules.pop("evil_plugin_17", None)


def test_card_naming_a_module_path_through_the_registry_is_refused(tmp_path, monkeypatch):
    """`imports: [registry.m.1.plugin]` from the directory above the registry (`python -m` puts it on
    sys.path; importlib accepts the digit part): refused, nothing runs."""
    vdir = tmp_path / "registry" / "m" / "1"
    vdir.mkdir(parents=True)
    marker = tmp_path / "ran"
    (vdir / "plugin.py").write_text(PLUGIN.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("HPC_TRUST_PLUGINS", raising=False)
    for name in ("registry.m.1.plugin", "registry"):
        with pytest.raises(ValueError, match="not a module name|not an installed module"):
            import_card_plugin(name, tmp_path / "registry", vdir, "evil")
    assert not marker.exists() and "registry" not in sys.modules


def test_installed_plugins_still_load(tmp_path):
    reg = tmp_path / "registry"
    import_card_plugin("hpc.ensemble.hierarchical", reg, reg / "m" / "1", "hierarchical")
    import_card_plugin("json", reg, reg / "m" / "1", "x")
    with pytest.raises(ValueError, match="not a module name"):
        import_card_plugin("../x", reg, reg / "m" / "1", "x")


def test_trust_plugin_flag_reaches_the_environment(monkeypatch):
    from hpc.cli.infer import trust_plugins_from_args

    monkeypatch.delenv("HPC_TRUST_PLUGINS", raising=False)

    class A:
        trust_plugin = ["a.b", "c"]

    trust_plugins_from_args(A())
    assert os.environ["HPC_TRUST_PLUGINS"] == "a.b,c"


# -- item 7: names that become directories --------------------------------------------------------
@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "../x", "a\\b", ".hidden", "a b", "x\n", "-x", "a" * 101])
def test_one_name_rule_refuses_traversal(bad):
    assert not is_name(bad)
    with pytest.raises(ValueError, match="not a valid name"):
        check_name(bad, "name")


@pytest.mark.parametrize("key", ["name", "run_id"])
@pytest.mark.parametrize("bad", ["..", ".", "a/..", "x y"])
def test_train_config_run_dir_names_cannot_leave_out_dir(key, bad):
    with pytest.raises(ValueError, match=rf"config\.{key}: .* is not a valid name"):
        load_config({**BASE, key: bad})


def test_registry_and_ensemble_names_use_the_same_rule(tmp_path):
    for bad in ("..", ".x", "a/b"):
        with pytest.raises(ValueError):
            parse_ref(f"{bad}@production")
        with pytest.raises(ValueError, match="not a valid name"):
            load_config({**BASE, "registry": {"name": bad}})
    spec = tmp_path / "e.yaml"
    spec.write_text("name: ..\nbase: digits_mlp\nmethod: bagging\nbagging: {members: 2}\n")
    with pytest.raises(ValueError, match=r"\.name: '\.\.' is not a valid name"):
        load_spec(spec)
    assert check_name("ok-1.2_x", "name") == "ok-1.2_x"


# -- item 14: sbatch line injection ---------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("sbatch_args", ["--comment=x\n#SBATCH --uid=0\nrm -rf ~"]),
                                         ("sbatch_args", ["--reservation=r\r"]),
                                         ("partition", "debug\necho pwned"), ("account", "a\nb"),
                                         ("dependency", "afterok:1\nx")])
def test_newline_in_a_rendered_value_is_refused(tmp_path, field, value):
    res = SlurmResources(**{field: value})
    with pytest.raises(ValueError, match="newline or control character"):
        render_sbatch(res, tmp_path, sys.executable)


def test_plain_sbatch_args_still_render(tmp_path):
    script = render_sbatch(SlurmResources(sbatch_args=["--reservation=r1", "--exclusive"]), tmp_path, sys.executable)
    assert "#SBATCH --reservation=r1" in script
    with pytest.raises(ValueError, match="newline"):
        render_sbatch(SlurmResources(), tmp_path / "a\nb", sys.executable)


# -- item 10: hostile YAML ------------------------------------------------------------------------
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "name: *i\n"


def test_billion_laughs_is_refused_before_expanding(tmp_path):
    p = tmp_path / "laughs.yaml"
    p.write_text(LAUGHS)
    assert len(LAUGHS) < 1024
    tracemalloc.start()
    with pytest.raises(ValueError, match="expands .* more than 100000 nodes"):
        load_config(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # fully expanded it would be 10**9 nodes (GBs); refused while counting, it never gets near that
    assert peak < 50e6, peak


def test_recursive_alias_is_refused():
    import yaml

    with pytest.raises(yaml.YAMLError, match="expands"):
        load_yaml("a: &a [*a, 1]\n")


def test_a_little_aliasing_still_works(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("data: &d {dir: d}\nmodel: {family: softmax}\ntrain: {epochs: 1}\n")
    assert load_config(p, ["data.batch_size=4"]).data.batch_size == 4
    assert load_yaml("x: &v [1, 2]\ny: *v\n")["y"] == ["1", "2"]


def test_oversized_config_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.yaml"
    with open(p, "wb") as fh:                 # sparse: 2 GiB on disk costs nothing
        fh.truncate(2 << 30)
    tracemalloc.start()
    with pytest.raises(ValueError, match=rf"at most {MAX_CONFIG_BYTES} bytes \(1 MiB\)"):
        read_yaml_mapping(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10e6, peak  # the 2 GiB were never read into memory
    small = tmp_path / "edge.yaml"
    small.write_text("name: x\n" + "#" * (MAX_CONFIG_BYTES - 100) + "\n")
    assert read_yaml_mapping(small)["name"] == "x"


def test_apply_overrides_copies_only_the_path_and_leaves_the_input_alone():
    shared = {"k": list(range(10))}
    data = {"data": {"dir": "d", "x": shared}, "model": {"family": "softmax", "config": shared}}
    out = apply_overrides(data, ["data.batch_size=4", "model.config.k=1"])
    assert data["data"] == {"dir": "d", "x": shared} and data["model"]["config"] is shared and shared["k"] == list(range(10))
    assert out["data"]["batch_size"] == "4" and out["data"]["x"] is shared        # not deep-copied
    assert out["model"]["config"] == {"k": "1"}   # Raw text until typed
