"""`hpc doctor`: will this machine / allocation run the suite? One row per check: ok, warn or fail.

Each check is a function ``(DoctorConfig) -> list[Row]`` that never raises (an unexpected error
becomes a ``fail`` row naming it), so one broken thing never hides the others. The expensive
ones (a real 2-rank all-reduce through the launcher, reading the data) are bounded in time and bytes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from hpc.dist.spawn import MPIEXEC_HINT, find_mpiexec
from hpc.dist.world import World, mpi_env_for_root, world_from_env
from hpc.launch.sbatch import SlurmResources, render_sbatch

VERDICTS = ("ok", "warn", "fail")
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.sshfs",
             "glusterfs", "panfs", "wekafs", "fuse.gcsfuse", "9p", "virtiofs")
PREEMPT_SIGNALS = ("USR2", "TERM")  # what hpc.train.preempt handles


@dataclass
class Row:
    check: str
    verdict: str
    detail: str
    advice: str = ""

    def __post_init__(self) -> None:
        assert self.verdict in VERDICTS, self.verdict


@dataclass(frozen=True)
class DoctorConfig:
    data: Path | None = None
    run_dir: Path = Path("runs")
    registry: Path | None = None        # default: $HPC_REGISTRY or ./registry (as `hpc registry`)
    output: Path | None = None
    mpi: bool = True
    mpi_ranks: int = 2
    mpi_mb: float = 16.0
    mpi_timeout_s: float = 90.0
    read_mb: float = 256.0
    checksums: bool = False             # sha256 every shard (reads all the data) instead of sizes
    min_free_gb: float = 10.0
    min_shm_gb: float = 1.0

    def __post_init__(self) -> None:
        if self.mpi_ranks < 2:
            raise ValueError(f"--mpi-ranks {self.mpi_ranks}: must be >= 2 (an all-reduce needs two ranks)")
        for name in ("mpi_mb", "mpi_timeout_s", "read_mb", "min_free_gb", "min_shm_gb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} {getattr(self, name)}: must be > 0")
        if self.data is not None and not Path(self.data).exists():
            raise ValueError(f"--data {self.data}: no such directory")


# -- helpers --------------------------------------------------------------------------------------

def fs_type(path: str | os.PathLike) -> tuple[str, str]:
    """(file system type, mount point) holding ``path``: the longest mount prefix in /proc/mounts."""
    p = os.path.realpath(_existing(Path(path)))
    best = ("unknown", "/")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (parts[2], mnt)
    except OSError:
        pass
    return best


def _existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


def probe_write(directory: Path) -> str | None:
    """Create ``directory`` if needed and write+fsync+delete a file in it; None or the error."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hpc-doctor.", dir=directory)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        return f"{e.strerror or e} ({type(e).__name__})"
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# -- checks ---------------------------------------------------------------------------------------

def check_versions(cfg: DoctorConfig) -> list[Row]:
    rows = []
    py = sys.version_info
    rows.append(Row("python", "ok" if py >= (3, 10) else "fail", f"{platform.python_version()} ({sys.executable})",
                    "" if py >= (3, 10) else "hpc needs Python >= 3.10"))
    for dist, why in (("torch", "models and training"), ("numpy", "everything"), ("h5py", "data shards"),
                      ("mpi4py", "the mpi backend")):
        v = _version(dist)
        extra = ""
        if dist == "h5py" and v:
            try:
                import h5py
                extra = f" (HDF5 {h5py.version.hdf5_version})"
            except ImportError as e:
                v, extra = None, f" (installed but not importable: {e})"
        rows.append(Row(dist, "ok" if v else "fail", (v + extra) if v else f"not installed ({why})",
                        "" if v else "pip install -e . (see README: install torch first, pinned)"))
    gpus = _gpus()
    cupy = next((v for v in (_version(d) for d in ("cupy", "cupy-cuda12x", "cupy-cuda13x")) if v), None)
    if cupy:
        rows.append(Row("cupy", "ok", cupy))
    else:
        rows.append(Row("cupy", "warn" if gpus else "ok",
                        "not installed" + ("" if gpus else " (no GPU: the torch kernels are used)"),
                        "pip install -e .[gpu] (cupy-cuda12x) for the CuPy kernels" if gpus else ""))
    rows.append(Row("gpus", "ok", ", ".join(gpus) if gpus else "none visible (CPU training; "
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"))
    return rows


def _gpus() -> list[str]:
    try:
        import torch
        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA install shows up as "no GPU" plus the torch row
        pass
    return []


def launcher_command(cfg: DoctorConfig, world: World) -> tuple[list[str] | None, str]:
    """The launcher in use: srun inside a Slurm allocation with >= 2 tasks, else mpiexec."""
    if world.under_slurm and shutil.which("srun") and (world.slurm_ntasks or 1) >= cfg.mpi_ranks:
        return ["srun", f"--ntasks={cfg.mpi_ranks}", "--mpi=pmix", "--overlap"], "srun (Slurm allocation)"
    exe = find_mpiexec()
    if exe is None:
        return None, "mpiexec"
    return [exe, "-n", str(cfg.mpi_ranks), "--oversubscribe"], f"mpiexec ({exe})"


def check_mpi(cfg: DoctorConfig) -> list[Row]:
    if not cfg.mpi:
        return [Row("mpi", "warn", "skipped (--no-mpi)")]
    env = dict(os.environ)
    env.update(mpi_env_for_root(env))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd, name = launcher_command(cfg, world_from_env(env))
    if cmd is not None and cmd[0] != "srun":
        # Ranks on this machine: as hpc.dist.spawn.launch_env, mpiexec must not take a surrounding
        # job's node list for its own (it hangs where the Slurm node name is not the host's).
        env.setdefault("PRTE_MCA_ras", "^slurm")
    if cmd is None:
        return [Row("mpi", "fail", f"mpiexec not found next to {sys.executable} nor on PATH", MPIEXEC_HINT)]
    cmd += [sys.executable, "-m", "hpc.monitor.mpi_probe", str(cfg.mpi_mb)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.mpi_timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return [Row("mpi", "fail", f"{cfg.mpi_ranks}-rank all-reduce via {name} did not finish in "
                    f"{cfg.mpi_timeout_s:.0f}s", "the ranks cannot reach each other: check the network "
                    "interfaces (OMPI_MCA_btl_tcp_if_include), firewalls, and `mpiexec -n 2 hostname`")]
    except OSError as e:
        return [Row("mpi", "fail", f"{name} cannot start: {e}", MPIEXEC_HINT)]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return [Row("mpi", "fail", f"{cfg.mpi_ranks}-rank all-reduce via {name} exited {proc.returncode}: "
                    + " | ".join(tail), "run the command by hand: " + " ".join(cmd))]
    res = json.loads(line)
    if not res["ok"]:
        return [Row("mpi", "fail", f"all-reduce via {name} returned a wrong sum", "the MPI library is broken: "
                    "mpi4py must be built against the MPI that launches it (docs/dist.md)")]
    return [Row("mpi", "ok", f"{res['size']}-rank all-reduce correct via {name}; {res['library']}"),
            Row("allreduce bandwidth", "ok", f"{res['busbw_gbs']:.2f} GB/s bus, {res['algbw_gbs']:.2f} GB/s "
                f"algorithm ({res['mb']:g} MiB float32, {res['seconds_per_allreduce'] * 1e3:.1f} ms each, "
                f"hosts {', '.join(res['hosts'])})")]


def check_slurm(cfg: DoctorConfig) -> list[Row]:
    if shutil.which("sinfo") is None:
        return [Row("slurm", "warn", "no Slurm client on PATH: local runs only (hpc train --nproc N)",
                    "on a cluster, run on a login node or `module load slurm`")]
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P|%a|%l|%D|%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return [Row("slurm", "fail", "sinfo did not answer in 30s", "is slurmctld up? `scontrol ping`")]
    if proc.returncode != 0:
        return [Row("slurm", "fail", f"sinfo failed: {proc.stderr.strip()[:200]}",
                    "check SLURM_CONF / munge (`scontrol ping`); locally: slurm/dev-cluster.sh up")]
    parts: dict[str, list] = {}
    for line in proc.stdout.splitlines():
        f = line.split("|")
        if len(f) == 5:
            p = parts.setdefault(f[0], [f[1], f[2], 0, set()])
            p[2] += int(f[3]) if f[3].isdigit() else 0
            p[3].add(f[4])
    usable = [n for n, p in parts.items() if p[0] == "up" and p[3] & {"idle", "mixed", "allocated", "completing"}]
    desc = "; ".join(f"{n} ({p[0]}, limit {p[1]}, {p[2]} nodes {'/'.join(sorted(p[3]))})" for n, p in parts.items())
    if not usable:
        return [Row("slurm", "fail", f"no partition up with usable nodes: {desc or 'no partitions'}",
                    "ask the admins; `sinfo -R` shows why nodes are down")]
    return [Row("slurm", "ok", f"reachable; partitions: {desc}")]


def signal_verdict(script: str, source: str) -> Row:
    """The warning-signal row for a batch script's ``#SBATCH --signal`` (pure)."""
    import re

    m = re.search(r"^#SBATCH\s+--signal[= ]\s*(\S+)", script, re.M)
    pitfall = ("USR1 is a bad choice: the trainer checkpoints on USR2/TERM; USR1 ends a Python rank by default "
               "(mid-collective, so NCCL peers hang until their timeout) and NCCL/launchers may use it. "
               "Use --signal=USR2@90 (what `hpc submit` sends); the handler only sets a flag, ranks agree on "
               "it at a step boundary, then all checkpoint and requeue")
    if not m:
        return Row("warning signal", "warn", f"{source}: no --signal: the time limit kills ranks mid-step, "
                   "losing everything since the last checkpoint", "submit with `hpc submit` or add "
                   "#SBATCH --signal=USR2@90; " + pitfall.split(". ", 1)[1])
    spec = m.group(1)
    sm = re.fullmatch(r"(R?B?:)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?", spec)
    if not sm:
        return Row("warning signal", "warn", f"{source}: --signal={spec} not understood", pitfall)
    prefix, sig, delay = sm.group(1) or "", sm.group(2), int(sm.group(3) or 60)
    if sig in ("USR1", "10"):
        return Row("warning signal", "warn", f"{source}: --signal={spec}", pitfall)
    if sig not in PREEMPT_SIGNALS and sig not in ("12", "15"):
        return Row("warning signal", "warn", f"{source}: --signal={spec}: the trainer does not handle SIG{sig}",
                   pitfall)
    if "B" in prefix:
        return Row("warning signal", "warn", f"{source}: --signal={spec} goes to the batch shell only",
                   "the ranks never see it: drop 'B:' or forward it to the srun step")
    if delay < 60:
        return Row("warning signal", "warn", f"{source}: SIG{sig} only {delay}s before the limit",
                   "an all-rank checkpoint may not fit: use @90 or more (hpc submit --signal-delay-s)")
    return Row("warning signal", "ok", f"{source}: SIG{sig} {delay}s before the time limit (handled by the trainer)")


def check_signal(cfg: DoctorConfig) -> list[Row]:
    job = world_from_env().slurm_job_id
    if job and shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True,
                              timeout=30)
        if proc.returncode == 0:
            return [signal_verdict(proc.stdout, f"job {job}")]
    try:
        script = render_sbatch(SlurmResources(), tempfile.gettempdir(), sys.executable)
    except Exception as e:  # noqa: BLE001 - report, do not crash the doctor
        return [Row("warning signal", "warn", f"cannot render the `hpc submit` script: {e}")]
    return [signal_verdict(script, "hpc submit")]


def check_shm(cfg: DoctorConfig) -> list[Row]:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return [Row("/dev/shm", "warn", "missing", "shared-memory transports (MPI vader/NCCL) and data loader "
                    "workers need it; in containers add --shm-size")]
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    ok = total >= cfg.min_shm_gb * (1 << 30)
    return [Row("/dev/shm", "ok" if ok else "warn", f"{_gib(total)} ({_gib(free)} free)",
                "" if ok else f"less than {cfg.min_shm_gb:g} GiB: MPI/NCCL shared-memory transports and loader "
                "workers fail with bus errors; docker --shm-size=8g, or ask for a larger tmpfs")]


def check_hdf5_locking(cfg: DoctorConfig) -> list[Row]:
    where = Path(cfg.data) if cfg.data else cfg.run_dir
    fstype, mnt = fs_type(where)
    env = os.environ.get("HDF5_USE_FILE_LOCKING")
    off = (env or "").upper() == "FALSE"
    shard = next(iter(sorted(Path(cfg.data).rglob("*.h5"))), None) if cfg.data else None
    if shard is not None:
        try:
            import h5py
            with h5py.File(shard, "r"):
                pass
        except OSError as e:
            if "lock" in str(e).lower():
                return [Row("hdf5 locking", "fail", f"{shard}: {e}",
                            "export HDF5_USE_FILE_LOCKING=FALSE (the shards are read-only, locking buys nothing)")]
        except ImportError:
            pass
    if fstype in SHARED_FS and not off:
        return [Row("hdf5 locking", "warn", f"{where} is on {fstype} ({mnt}); HDF5 file locking is on",
                    "export HDF5_USE_FILE_LOCKING=FALSE: on Lustre/GPFS/NFS flock is slow, unsupported "
                    "(errno 38) or hangs with many readers; the shards are read-only")]
    state = "off (HDF5_USE_FILE_LOCKING=FALSE)" if off else "on"
    return [Row("hdf5 locking", "ok", f"{where} on {fstype} ({mnt}); locking {state}"
                + (f"; opened {shard.name}" if shard else ""))]


def check_dirs(cfg: DoctorConfig) -> list[Row]:
    from hpc.registry.store import default_root

    rows = []
    dirs = [("run dir", cfg.run_dir), ("registry", cfg.registry or default_root())]
    if cfg.output:
        dirs.append(("output dir", cfg.output))
    umask = os.umask(0)
    os.umask(umask)
    for name, d in dirs:
        d = Path(d)
        target = d if d.exists() else _existing(d)
        err = probe_write(target) if target.is_dir() else f"{target} is not a directory"
        if err:
            rows.append(Row(name, "fail", f"{d}: cannot write ({err})",
                            f"create it with write permission, or point {name} elsewhere"))
            continue
        mode = target.stat().st_mode
        problems = []
        if umask & 0o040:
            problems.append(f"umask {umask:03o} makes new files unreadable to the group")
        if mode & 0o050 != 0o050:
            problems.append(f"{target} is mode {mode & 0o777:03o} (group cannot list it)")
        where = "" if d.exists() else f" (does not exist yet; {target} is writable)"
        rows.append(Row(name, "warn" if problems else "ok", f"{d} writable{where}" + ("; " + "; ".join(problems)
                        if problems else ", group-readable"),
                        "umask 0022 (or 0027) and chmod g+rX so teammates and jobs of other users can read"
                        if problems else ""))
    return rows


def check_kernel_cache(cfg: DoctorConfig) -> list[Row]:
    # The kernels' own resolution (HPC_KERNEL_CACHE_DIR, CUPY_CACHE_DIR, else a node-local default),
    # so the doctor checks the directory CuPy will really use.
    from hpc.kernels._runtime import CACHE_ENV, cache_dir

    source = next((v for v in (CACHE_ENV, "CUPY_CACHE_DIR") if os.environ.get(v)), "the default")
    advice = f"export {CACHE_ENV}=/tmp/$USER/cupy-kernel-cache (or a node-local SSD)"
    try:
        path = cache_dir()
    except ValueError as e:
        return [Row("kernel cache", "fail", str(e), advice)]
    err = probe_write(path)  # os.access says yes to root even where a write fails
    if err:
        return [Row("kernel cache", "fail", f"{path} (from {source}): not writable: {err}", advice)]
    fstype, mnt = fs_type(path)
    if fstype in SHARED_FS:
        return [Row("kernel cache", "warn", f"{path} (from {source}) is on {fstype} ({mnt}), shared by nodes",
                    "use a node-local directory: ranks on many nodes compiling into one shared cache race and "
                    f"stall on metadata; {advice}")]
    return [Row("kernel cache", "ok", f"{path} (from {source}) writable, node-local ({fstype})")]


def check_data(cfg: DoctorConfig) -> list[Row]:
    if cfg.data is None:
        return []
    from hpc.data.verify import verify_tree

    problems, n = verify_tree(cfg.data, checksums=cfg.checksums)
    how = "sha256" if cfg.checksums else "sizes, datasets, shapes"
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        rows = [Row("data integrity", "fail", "; ".join(problems[:3]) + more,
                    "regenerate or re-copy the named shards (hpc data shard/synth), then `hpc data verify`")]
    else:
        rows = [Row("data integrity", "ok", f"{n} shards match their manifests ({how})")]
    rows.append(_read_bandwidth(Path(cfg.data), cfg.read_mb))
    return rows


def _read_bandwidth(data: Path, read_mb: float) -> Row:
    files = sorted(p for p in data.rglob("*.h5") if p.is_file())
    budget, done, chunk = int(read_mb * (1 << 20)), 0, 8 << 20
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            try:  # drop cached pages so this measures the file system, not RAM (where the OS allows)
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
            while done < budget:
                b = f.read(min(chunk, budget - done))
                if not b:
                    break
                done += len(b)
        if done >= budget:
            break
    dt = time.perf_counter() - t0
    if done == 0:
        return Row("data read bandwidth", "warn", f"{data}: no .h5 shards to read")
    mbs = done / dt / 1e6
    if done < chunk:
        return Row("data read bandwidth", "ok", f"{mbs:,.0f} MB/s, but only {done / 1e6:.2f} MB to read: "
                   "too little to measure the file system")
    slow = mbs < 100
    return Row("data read bandwidth", "warn" if slow else "ok",
               f"{mbs:,.0f} MB/s ({done / 1e6:,.0f} MB from {data}, one reader)",
               "under 100 MB/s per reader: stage the data to node-local disk or raise the reader's prefetch"
               if slow else "")


def check_free_space(cfg: DoctorConfig) -> list[Row]:
    target = _existing(Path(cfg.run_dir))
    st = os.statvfs(target)
    free = st.f_bavail * st.f_frsize
    need = cfg.min_free_gb * (1 << 30)
    verdict = "ok" if free >= need else ("fail" if free < need / 10 else "warn")
    return [Row("checkpoint space", verdict, f"{_gib(free)} free for {cfg.run_dir} (on {target})",
                "" if verdict == "ok" else f"under {cfg.min_free_gb:g} GiB: checkpoints (model + optimizer "
                "per save, `keep` of them) will fail; clean old runs or point the run dir elsewhere")]


CHECKS: tuple[Callable[[DoctorConfig], list[Row]], ...] = (
    check_versions, check_mpi, check_slurm, check_signal, check_shm, check_hdf5_locking, check_dirs,
    check_kernel_cache, check_data, check_free_space)


def run_doctor(cfg: DoctorConfig, checks=CHECKS) -> list[Row]:
    rows: list[Row] = []
    for check in checks:
        try:
            rows += check(cfg)
        except Exception as e:  # noqa: BLE001 - a crashing check is a finding, not the doctor's end
            rows.append(Row(check.__name__.removeprefix("check_"), "fail", f"check crashed: {type(e).__name__}: {e}"))
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows) if rows else 10
    lines = []
    for r in rows:
        lines.append(f"{r.check:<{width}}  {r.verdict.upper():<4}  {r.detail}")
        if r.advice:
            lines.append(f"{'':<{width}}        -> {r.advice}")
    n = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    lines.append(f"\n{n['ok']} ok, {n['warn']} warn, {n['fail']} fail")
    return "\n".join(lines)


def rows_json(rows: list[Row]) -> dict:
    return {"ok": not any(r.verdict == "fail" for r in rows), "rows": [asdict(r) for r in rows]}
