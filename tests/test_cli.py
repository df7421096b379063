"""The `hpc` entry points: help, version, bad arguments (exit 2 with what is valid)."""

import subprocess
import sys

import pytest

from hpc import __version__
from hpc.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("data", "train", "infer", "registry", "submit", "bench"):
        assert cmd in r.stdout, f"`hpc --help` does not list {cmd!r}:\n{r.stdout}"


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"hpc {__version__}"


def test_unknown_command_exits_2_and_lists_valid():
    r = run("frobnicate")
    assert r.returncode == 2
    assert "invalid choice: 'frobnicate'" in r.stderr
    assert "train" in r.stderr  # the message lists what is valid


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: hpc" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bench", "nonsense"], ["version", "--bogus"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
