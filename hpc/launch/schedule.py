"""`hpc schedule infer|list|remove`: batch scoring on a cron cadence through Slurm's scrontab.

An entry runs ``python -m hpc.launch.schedule --model M --input I --output ROOT``. Two kinds of input:

- a **landing zone** (a directory that is not itself a split: operators drop Parquet/CSV files or
  shard-set directories into it): each run scores only the drops not scored yet (keyed by path and
  content sha256), one output directory per drop, records them in an append-only ledger and then
  publishes ``ROOT/_INDEX.json``, the list of every scored input (``run_landing``,
  ``hpc.launch.landing``);
- a **split** (a directory with ``manifest.json``) or a file: re-scored whole at every run into
  ``ROOT/<run id>/``; only once that run has its ``_SUCCESS`` marker, ``ROOT/latest`` swings to it
  with an atomic rename of a symlink, so readers of ``ROOT/latest`` see the previous complete
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
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cronsim import CronSim, CronSimError

from hpc.dist.world import mpi_env_for_root, world_from_env
from hpc.launch import landing, slurm
from hpc.launch.sbatch import SlurmResources
from hpc.registry import default_root
from hpc.util.io import fsync_dir, read_json

BEGIN, END = "# hpc-schedule ", "# hpc-schedule end "

# ------------------------------------------------------------------------------- cron expressions
# cronsim (a kept, dependency-free cron library) checks values and ranges, computes run times and
# explains expressions. On top of it we keep only what Slurm's scrontab parser accepts
# (src/scrontab/parse.c, whose 5-field grammar has not changed since 20.11) and where scrontab and
# cron (the crontab fallback) agree on the run times, so the next runs we print are the ones both use.
FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_VALID = ("0-59", "0-23", "1-31", "1-12 or one name jan..dec", "0-7 with 0 and 7 Sunday, or one name sun..sat")
_FIRST = (0, 0, 1, 1, 1)          # scrontab counts a step from here, whatever the range says
_STEP_MAX = (60, 24, 31, 12, 7)   # scrontab refuses steps < 2 and >= its bitmap size (61, 25, 32, 13, 8)
# The forms scrontab's parser reads: '*' or '*/step', one range with a step, numbers and ranges
# in a list, or a lone month or day name (a name in a list or range fails there with "something is
# broken"; cron's L, W, # and ? extensions, which cronsim takes, fail too).
_SCRON_FORM = re.compile(r"\*(/\d+)?|\d+-\d+/\d+|\d+(-\d+)?(,\d+(-\d+)?)*")
_NAME = re.compile("[a-z]+")
# scrontab's nicknames (man scrontab) and the fields they stand for, which cronsim reads; no @reboot.
NICKNAMES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
             "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_SYNTAX = ("5 fields 'minute hour day-of-month month day-of-week', each *, a number, a range a-b, "
           "a list a,b,c or */step (e.g. '0 2 * * *' daily at 02:00, '*/15 * * * 1-5'), or one of "
           + ", ".join(NICKNAMES))
_ANY_TIME = datetime(2000, 1, 1)  # cronsim wants a start time even to only parse


def _cronsim(expr: str, after: datetime = _ANY_TIME) -> CronSim:
    return CronSim(NICKNAMES.get(expr, expr), after)


def _field_problem(i: int, value: str) -> str | None:
    """What scrontab or cron would refuse or read differently in field ``i`` alone (pure)."""
    name = FIELDS[i]
    bad = f"{name} {value!r} is not valid ({name}: {_VALID[i]})"
    if not (_SCRON_FORM.fullmatch(value) or (i >= 3 and _NAME.fullmatch(value))):
        if i >= 3 and re.search("[a-z]", value) and re.search("[,-]", value):
            return (f"{name} {value!r}: scrontab takes a {name} name only on its own, not in a list or "
                    f"range; write numbers ({name}: {_VALID[i]})")
        if "/" in value:
            return f"{name} {value!r}: a step /n may only follow * or one range a-b"
        return bad
    step = re.fullmatch(r"(\*|(\d+)-\d+)/(\d+)", value)
    if step:
        n = int(step[3])
        if name == "day-of-week" and step[2] is None:
            return (f"{name} {value!r}: scrontab counts day-of-week steps from Monday, cron from Sunday, "
                    f"so they would run on different days; list the days instead (e.g. 1,3,5)")
        if not 2 <= n <= _STEP_MAX[i]:
            return (f"{name} {value!r}: step {n} is not valid (scrontab takes {name} steps 2-{_STEP_MAX[i]}"
                    + ("; for every value write *)" if n == 1 else ")"))
        if step[2] is not None and (int(step[2]) - _FIRST[i]) % n:
            return (f"{name} {value!r}: scrontab counts the step from {_FIRST[i]}, cron from {step[2]}, so "
                    f"they would run at different times; write the values as a list instead")
    try:
        _cronsim(" ".join(value if j == i else "*" for j in range(5)))
    except CronSimError:
        return bad
    return None


def validate_cron(expr: str) -> str:
    """``expr`` as scrontab and cron both take it, normalized (single spaces, lower case) (pure).

    Raises ValueError naming every invalid field with its value and valid range.
    """
    expr = " ".join(str(expr).split()).lower()
    if expr.startswith("@"):
        if expr in NICKNAMES:
            return expr
        why = ("scrontab has no @reboot (Slurm starts entries at clock times, not at boot)"
               if expr == "@reboot" else "unknown nickname")
        raise ValueError(f"--cron {expr!r}: {why}; use one of {', '.join(NICKNAMES)} or 5 fields")
    fields = expr.split(" ") if expr else []
    if len(fields) != 5:
        extra = (": scrontab has no seconds (or year) field" if len(fields) == 6 else "")
        raise ValueError(f"--cron {expr!r}: {len(fields)} fields{extra}; expected {_SYNTAX}")
    problems = [p for i, f in enumerate(fields) if (p := _field_problem(i, f))]
    if not problems and fields[2].startswith("*/") and fields[4] != "*":
        problems.append(f"day-of-month {fields[2]!r} with day-of-week {fields[4]!r}: scrontab runs on "
                        f"days matching either, cron on days matching both; list the days of the month")
    if not problems:
        try:
            _cronsim(expr)
        except CronSimError:  # every field is valid alone: the day never occurs in those months
            problems.append(f"day-of-month {fields[2]!r} never occurs in month {fields[3]!r}")
    if problems:
        raise ValueError(f"--cron {expr!r}: " + "; ".join(problems))
    return expr


def next_runs(cron: str, after: datetime, count: int = 3) -> list[datetime]:
    """The next ``count`` times ``cron`` fires after ``after`` (pure).

    A naive ``after`` is wall-clock local time, which is how Slurm computes them (localtime());
    an aware one is taken in its own zone, DST included.
    """
    runs = _cronsim(validate_cron(cron), after)
    return [next(runs) for _ in range(count)]


def describe_cron(cron: str, after: datetime, count: int = 3) -> str:
    """``cron``, what it means and its next runs as local times with their zone, for the user (pure
    but for the machine's time zone, which names naive times)."""
    cron = validate_cron(cron)
    # A naive time gets this machine's zone for that very date, so a DST change between runs shows.
    times = [(t if t.tzinfo else t.astimezone()).strftime("%a %Y-%m-%d %H:%M %Z (UTC%z)")
             for t in next_runs(cron, after, count)]
    return (f"{cron} ({_cronsim(cron).explain()}); next {count} runs (local time):\n"
            + "\n".join(f"  {t}" for t in times))


def now() -> datetime:
    """Local wall-clock time; a function so tests can fix it."""
    return datetime.now()


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
        check_roots(Path(self.input), Path(self.output))
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
    opts = [f"--job-name={r.name}", f"--time={r.sbatch_time}", f"--nodes={r.nodes}",
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
    command = f"sbatch {opts} --wrap {shlex.quote(runner_command(s))}"
    # cron turns an unescaped % of the command into a newline and feeds the rest to stdin, which cut
    # the line at --output=.../%j.out (sbatch: "This does not look like a batch script"); it passes
    # \% on as a plain %. scrontab has no such rule, so render_block keeps its % as they are.
    return f"{s.cron} " + command.replace("%", r"\%")


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


def block_cron(block: str) -> str:
    """The cron expression of one of our blocks: the head of its only line that is not a comment (pure)."""
    words = next((ln.split() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")), [])
    return " ".join(words[:1] if words[:1] and words[0].startswith("@") else words[:5])


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
def is_landing_zone(path: str | os.PathLike) -> bool:
    """A directory that is not itself a split (no manifest.json): its drops are scored incrementally."""
    p = Path(path)
    return p.is_dir() and not (p / landing.MANIFEST_NAME).is_file()


def describe_input(s: Schedule) -> str:
    """What each run will do with ``s.input``, as things stand now (for the user)."""
    if is_landing_zone(s.input):
        return (f"{s.input} is a landing zone: each run scores only the Parquet/CSV files and shard-set "
                f"directories not scored yet (or changed) into {s.output}/{landing.SCORED}/ and then "
                f"publishes {s.output}/{landing.INDEX}")
    return f"{s.input} is scored whole at every run into {s.output}/<run>/, then {s.output}/latest points at it"


def check_roots(input: Path, output: Path) -> None:
    """The output root may not be inside the input (its outputs would be new drops) nor hold it."""
    i, o = input.resolve(), output.resolve()
    if o == i or i in o.parents or o in i.parents:
        raise ValueError(f"--output {o}: must be outside --input {i} and not contain it (scored outputs "
                         "would be read back as new input, or the input deleted with the outputs)")


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
    fsync_dir(root)


def _run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{world_from_env().slurm_job_id or os.getpid()}"


def _score(model: str, input: str, dest: Path, ntasks: int, mpi: bool, registry: str | None) -> tuple[int, str]:
    """Score ``input`` into ``dest`` (``hpc infer``, or srun of it on ``ntasks``): (exit status, error)."""
    # The job body only: hpc.launch.tasks imports the inference job (torch, ~1 s measured), which
    # `hpc schedule infer|list|remove` (importing this module) must not wait for.
    from hpc.infer.job import InferConfig
    from hpc.launch.tasks import infer_argv, infer_task

    try:
        cfg = InferConfig(model=model, input=input, output=str(dest), registry=registry)
        if ntasks > 1:
            srun = ["srun", "-n", str(ntasks), "--kill-on-bad-exit=1"] + (["--mpi=pmix"] if mpi else [])
            rc = subprocess.call(srun + [sys.executable, "-m", "hpc", *infer_argv(cfg)],
                                 env={**os.environ, **mpi_env_for_root()})
            return rc, f"hpc infer on {ntasks} tasks exited {rc}" if rc else ""
        infer_task(cfg)
        return 0, ""
    except (ValueError, FileNotFoundError) as e:  # bad input: no traceback, as `hpc infer` says it
        print(f"hpc infer: error: {e}", file=sys.stderr, flush=True)
        return 2, str(e)
    except Exception as e:  # a failure at run time: the caller names the input and goes on
        traceback.print_exc()
        return 1, f"{type(e).__name__}: {e}"


def run_scheduled(name: str, model: str, input: str, output: str, ntasks: int = 1, mpi: bool = True,
                  registry: str | None = None) -> Path:
    """One scheduled run: a landing zone's new drops (``run_landing``; returns the index path), or
    ``input`` scored whole into ``output/<run id>/`` with ``output/latest`` moved to it."""
    if not Path(input).exists():
        raise ValueError(f"--input {input}: does not exist (a landing zone to watch for new drops, or a "
                         "split or file to re-score at every run)")
    check_roots(Path(input), Path(output))
    if is_landing_zone(input):
        return run_landing(name, model, input, output, ntasks, mpi, registry)
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    if (root / landing.LEDGER).is_file():
        raise ValueError(f"--output {root}: it holds the ledger of a landing zone ({landing.LEDGER}), but "
                         f"--input {input} is a split scored whole at every run; use another --output")
    run_id = _run_id()
    dest = root / run_id
    rc, _ = _score(model, input, dest, ntasks, mpi, registry)
    if rc != 0:
        raise SystemExit(f"schedule {name}: scoring {input} with {model} into {dest} exited {rc}; "
                         "latest unchanged")
    point_latest(root, run_id)
    print(f"schedule {name}: scored into {dest}; {root / 'latest'} -> {run_id}", flush=True)
    return dest


def run_landing(name: str, model: str, input: str, output: str, ntasks: int = 1, mpi: bool = True,
                registry: str | None = None) -> Path:
    """Score the drops of landing zone ``input`` not scored yet (new, or changed under the same path)
    into ``output/scored/<path>-<sha12>/``; append what happened to ``output/_LEDGER.jsonl``; then
    publish ``output/_INDEX.json``. A drop that fails is named, the others are scored, the index
    keeps what it had for it, and the run ends with SystemExit (2: bad input, else 1)."""
    zone, root = Path(input).resolve(), Path(output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (root / "latest").is_symlink():
        raise ValueError(f"--output {root}: it holds runs of an input scored whole (latest -> "
                         f"{os.readlink(root / 'latest')}); a landing zone needs an output root of its own")
    with landing.locked(root) as mine:
        if not mine:
            print(f"schedule {name}: another run holds {root / landing.LOCK}; nothing done", flush=True)
            return root / landing.INDEX
        return _run_landing(name, model, zone, root, ntasks, mpi, registry)


def _run_landing(name: str, model: str, zone: Path, root: Path, ntasks: int, mpi: bool,
                 registry: str | None) -> Path:
    run_id = _run_id()
    records = landing.read_ledger(root / landing.LEDGER)
    known = landing.known_stats(records)
    seen, hashed, ignored = landing.observe(zone, known)
    plan = landing.classify(landing.scored_state(records), seen)
    new = landing.restat_records(known, plan.unchanged)
    say = [f"schedule {name}: {zone}: {len(seen)} input(s), {len(hashed)} hashed (new or touched), "
           f"{len(plan.new)} new, {len(plan.changed)} changed, {len(plan.unchanged)} already scored"
           + (f"; ignored (not Parquet, CSV or a shard set): {', '.join(ignored)}" if ignored else "")
           + (f"; scored before, no longer there (kept in the index): {', '.join(plan.gone)}" if plan.gone else "")]
    failed, previous = [], {d.path: prev for d, prev in plan.changed}
    for d in plan.todo:
        dest = root / landing.output_name(d)
        rc, err = _score(model, str(zone / d.path), dest, ntasks, mpi, registry)
        if rc == 0 and not (dest / "_SUCCESS").is_file():
            rc, err = 1, f"{dest}: no _SUCCESS after scoring"
        if rc != 0:
            if rc == 2 and not (dest / "_SUCCESS").is_file():
                shutil.rmtree(dest, ignore_errors=True)  # bad input: nothing half-written stays
            failed.append((d, rc, err or f"exited {rc}"))
            new.append(d.record("failed", error=err, exit=rc, run=run_id, time=landing.utc_now()))
            continue
        man, prev = read_json(dest / "_MANIFEST.json"), previous.get(d.path)
        new.append(d.record("scored", output=landing.output_name(d), rows=int(man["rows"]),
                            model=(man.get("model") or {}).get("name"), run=run_id, time=landing.utc_now(),
                            model_version=(man.get("model") or {}).get("version"),
                            replaces=prev["sha256"] if prev else None))
        what = f"re-scored (content changed, was sha256 {prev['sha256'][:12]})" if prev else "scored"
        say.append(f"  {what} {d.path}: {man['rows']} rows -> {dest}")
    landing.append_ledger(root / landing.LEDGER, new)
    records += new
    index = landing.build_index(landing.scored_state(records), str(zone), landing.utc_now())
    if not landing.same_index(landing.read_index(root / landing.INDEX), index):
        landing.publish_index(root / landing.INDEX, index)
        say.append(f"  published {root / landing.INDEX}: {len(index['inputs'])} input(s), {index['rows']} rows")
    if not plan.todo:
        say.append(f"  nothing new to score: every input of {zone} is scored ({landing.INDEX} unchanged)")
    print("\n".join(say), flush=True)
    if failed:
        print(f"schedule {name}: {len(failed)} input(s) of {zone} could not be scored (the others were; "
              f"{landing.INDEX} lists only complete outputs):\n" + "\n".join(
                  f"  FAILED {d.path}: {err}" + ("; the index keeps its previous scoring" if d.path in previous
                                                 else "") for d, _, err in failed), file=sys.stderr, flush=True)
        raise SystemExit(2 if all(rc == 2 for _, rc, _ in failed) else 1)
    return root / landing.INDEX


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
    try:
        run_scheduled(a.name, a.model, a.input, a.output, a.ntasks, a.mpi, a.registry)
    except ValueError as e:
        print(f"schedule {a.name}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
