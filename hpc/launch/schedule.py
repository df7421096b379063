"""`hpc schedule infer|list|remove`: batch scoring on a cron cadence through Slurm's scrontab.

An entry runs ``python -m hpc.launch.schedule --model M --input I --output ROOT``: it scores into
``ROOT/<run id>/`` and, only once that run has its ``_SUCCESS`` marker, swings ``ROOT/latest`` to
it with an atomic rename of a symlink, so readers of ``ROOT/latest`` see the previous complete
output or the new complete one, never a partial run.

Entries live in the user's scrontab between ``# hpc-schedule NAME`` and ``# hpc-schedule end NAME``
lines; anything else in the scrontab is left alone. Where scrontab is missing or disabled (Debian's
slurm-client does not ship it; sites may not enable it), `hpc schedule infer` prints the
equivalent crontab line (cron + sbatch) and the reason instead; ``--run-now`` submits the same job
once through sbatch either way.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc.launch import slurm
from hpc.launch.sbatch import SlurmResources

_CRON_FIELD = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/\d+)?(,(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/\d+)?)*$")
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
BEGIN, END = "# hpc-schedule ", "# hpc-schedule end "


def validate_cron(expr: str) -> str:
    """A 5-field cron expression (or @daily etc.), normalized to single spaces (pure)."""
    expr = " ".join(str(expr).split())
    if expr in _MACROS:
        return expr
    fields = expr.split(" ")
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise ValueError(f"--cron {expr!r}: expected 5 fields 'minute hour day-of-month month day-of-week' "
                         f"(e.g. '0 2 * * *' daily at 02:00, '*/15 * * * *') or one of {', '.join(_MACROS)}")
    return expr


@dataclass
class Schedule:
    name: str
    cron: str
    model: str
    input: str
    output: str
    res: SlurmResources = field(default_factory=SlurmResources)
    registry: str | None = None        # registry root (default: $HPC_REGISTRY or ./registry, made absolute)
    cwd: str = field(default_factory=os.getcwd)
    python: str = field(default_factory=lambda: sys.executable)

    def check(self) -> "Schedule":
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits and _.- only")
        self.cron = validate_cron(self.cron)
        if "@" not in self.model:
            raise ValueError(f"--model {self.model!r}: expected NAME@ALIAS or NAME@VERSION (e.g. digits@production)")
        self.input, self.output = str(Path(self.input).resolve()), str(Path(self.output).resolve())
        from hpc.registry import default_root

        self.registry = str(Path(self.registry or default_root()).resolve())
        self.res.name = f"hpc-sched-{self.name}"
        self.res.check()
        return self


def runner_command(s: Schedule) -> str:
    """The shell command the entry runs (pure)."""
    argv = [s.python, "-m", "hpc.launch.schedule", "--name", s.name, "--model", s.model,
            "--input", s.input, "--output", s.output, "--registry", str(s.registry),
            "--ntasks", str(s.res.ntasks)]
    if not s.res.mpi:
        argv.append("--no-mpi")
    return f"cd {shlex.quote(s.cwd)} && {shlex.join(argv)}"


def sbatch_options(s: Schedule) -> list[str]:
    """The sbatch options of one run (pure); scrontab takes the same ones on ``#SCRON`` lines."""
    r = s.res
    opts = [f"--job-name={r.name}", f"--time={r.minutes}", f"--nodes={r.nodes}",
            f"--ntasks-per-node={r.tasks_per_node}", f"--cpus-per-task={r.cpus_per_task}",
            f"--output={s.output}/.logs/%j.out"]
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(r, key):
            opts.append(f"--{key}={getattr(r, key)}")
    if r.gpus_per_node:
        opts.append(f"--gpus-per-node={r.gpus_per_node}")
    return opts + list(r.sbatch_args)


def render_block(s: Schedule) -> str:
    """The scrontab lines of one schedule (pure)."""
    lines = [f"{BEGIN}{s.name}"] + [f"#SCRON {o}" for o in sbatch_options(s)]
    return "\n".join(lines + [f"{s.cron} {runner_command(s)}", f"{END}{s.name}", ""])


def crontab_line(s: Schedule) -> str:
    """The plain-cron equivalent: cron submits the same job with sbatch at the same times (pure)."""
    opts = " ".join(shlex.quote(o) for o in sbatch_options(s))
    return f"{s.cron} sbatch {opts} --wrap {shlex.quote(runner_command(s))}"


def parse_blocks(text: str) -> dict[str, str]:
    """``{name: block}`` of our entries in a scrontab's text (pure)."""
    blocks, name, cur = {}, None, []
    for line in text.splitlines():
        if line.startswith(END) and name is not None:
            blocks[name] = "\n".join(cur + [line]) + "\n"
            name, cur = None, []
        elif line.startswith(BEGIN) and not line.startswith(END):
            name, cur = line[len(BEGIN):].strip(), [line]
        elif name is not None:
            cur.append(line)
    return blocks


def remove_block(text: str, name: str) -> str:
    """``text`` without schedule ``name`` (pure)."""
    block = parse_blocks(text).get(name)
    return text.replace(block, "") if block else text


# ------------------------------------------------------------------------------- scrontab
def scrontab_unavailable() -> str | None:
    """Why scrontab cannot be used here, or None when it can."""
    if shutil.which("scrontab") is None:
        return ("`scrontab` is not installed on this machine (Slurm >= 20.11 ships it; Debian's "
                "slurm-client package does not)")
    proc = slurm.run(["scrontab", "-l"], check=False)
    msg = (proc.stderr or "").lower()
    if proc.returncode != 0 and ("disabled" in msg or "not enabled" in msg or "scronparameters" in msg):
        return f"scrontab is disabled on this cluster: {proc.stderr.strip()} (ScronParameters=enable)"
    return None


def _current() -> str:
    proc = slurm.run(["scrontab", "-l"], check=False)
    return proc.stdout if proc.returncode == 0 else ""


def _install_text(text: str) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".scrontab", delete=False) as f:
        f.write(text)
    try:
        slurm.run(["scrontab", f.name])
    finally:
        os.unlink(f.name)


def install(s: Schedule) -> str:
    """Install (or replace) schedule ``s``; returns what happened, for the user."""
    s.check()
    why = scrontab_unavailable()
    if why:
        return (f"not installed: {why}.\nThe equivalent crontab line (add it with `crontab -e` on a "
                f"machine that can run sbatch):\n{crontab_line(s)}")
    text = remove_block(_current(), s.name)
    _install_text(text.rstrip("\n") + ("\n" if text.strip() else "") + render_block(s))
    return f"installed schedule {s.name!r} ({s.cron}) in your scrontab:\n{render_block(s)}"


def list_schedules() -> dict[str, str]:
    why = scrontab_unavailable()
    if why:
        raise ValueError(f"cannot list schedules: {why}")
    return parse_blocks(_current())


def remove(name: str) -> str:
    text = _current() if not scrontab_unavailable() else ""
    if name not in parse_blocks(text):
        raise ValueError(f"no schedule named {name!r} in your scrontab (see `hpc schedule list`)")
    _install_text(remove_block(text, name))
    return f"removed schedule {name!r}"


def run_now(s: Schedule) -> str:
    """Submit the schedule's job once with sbatch (the same options and command); the job id."""
    s.check()
    Path(s.output, ".logs").mkdir(parents=True, exist_ok=True)
    out = slurm.run(["sbatch", "--parsable", *sbatch_options(s), "--wrap", runner_command(s)]).stdout
    return out.strip().split(";")[0]


# ------------------------------------------------------------------------------- the job body
def point_latest(root: Path, run_id: str) -> None:
    """Atomically make ``root/latest`` a symlink to ``run_id`` (which must hold ``_SUCCESS``)."""
    if not (root / run_id / "_SUCCESS").is_file():
        raise ValueError(f"{root / run_id}: no _SUCCESS marker; `latest` keeps pointing at the last complete run")
    latest = root / "latest"
    if latest.exists() and not latest.is_symlink():
        raise ValueError(f"{latest} exists and is not a symlink: move it away (it would hide the runs)")
    tmp = root / f".latest.{os.getpid()}.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(run_id, tmp)
    os.replace(tmp, latest)  # rename(2) over the old link: readers see old or new, never neither
    from hpc.util.io import fsync_dir

    fsync_dir(root)


def run_scheduled(name: str, model: str, input: str, output: str, ntasks: int = 1, mpi: bool = True,
                  registry: str | None = None) -> Path:
    """Score ``input`` into ``output/<run id>/``, then move ``output/latest`` to it."""
    import subprocess

    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.environ.get('SLURM_JOB_ID', os.getpid())}"
    dest = root / run_id
    argv = ["infer", "--model", model, "--input", input, "--output", str(dest)]
    if registry:
        argv += ["--registry", registry]
    if ntasks > 1:
        from hpc.dist.world import mpi_env_for_root

        srun = ["srun", "-n", str(ntasks)] + (["--mpi=pmix"] if mpi else [])
        rc = subprocess.call(srun + [sys.executable, "-m", "hpc", *argv], env={**os.environ, **mpi_env_for_root()})
    else:
        from hpc.cli import main

        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"schedule {name}: `hpc {' '.join(argv)}` exited {rc}; latest unchanged")
    point_latest(root, run_id)
    print(f"schedule {name}: scored into {dest}; {root / 'latest'} -> {run_id}", flush=True)
    return dest


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc.launch.schedule", description="one scheduled scoring run")
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--registry", default=None)
    p.add_argument("--ntasks", type=int, default=1)
    p.add_argument("--no-mpi", dest="mpi", action="store_false")
    a = p.parse_args(argv)
    run_scheduled(a.name, a.model, a.input, a.output, a.ntasks, a.mpi, a.registry)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
