"""Thin wrappers over the Slurm commands: find them, run them, read job states.

Job states come from ``sacct`` where the cluster keeps accounting and from ``squeue --states=all``
where it does not (the dev cluster, many small sites): without slurmdbd, sacct only says
"accounting storage is disabled" and submitit would warn on every poll and never learn that a job
died outside Python. ``install_submitit_watcher()`` plugs that fallback into submitit; it costs one
``scontrol show config`` per process.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import time
from typing import Iterable, Sequence

from submitit.slurm import slurm as ss

# Slurm's long state names that mean "not finished yet" (squeue %T and sacct agree on them).
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "PREEMPTED",
                           "STAGE_OUT", "SIGNALING", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})


class SlurmError(ValueError):
    """A Slurm command refused our request: carries Slurm's own message (a user error, exit 2)."""


def require(command: str) -> str:
    """Absolute path of a Slurm client command, or a ValueError saying how to get one."""
    path = shutil.which(command)
    if path is None:
        raise SlurmError(
            f"`{command}` not found on PATH: this machine has no Slurm client. Run on a cluster login "
            "node, bring up the local one with `sudo slurm/dev-cluster.sh up`, or use --local/--debug")
    return path


def run(args: Sequence[str], *, timeout: float = 60, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run a Slurm command; on failure raise SlurmError with Slurm's stderr verbatim."""
    exe = require(args[0])
    try:
        proc = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout,
                              input=input)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not answer within {timeout:.0f}s: is slurmctld up? "
                         "(`scontrol ping`)") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise SlurmError(f"`{' '.join(args)}` failed (exit {proc.returncode}): {msg}")
    return proc


@functools.lru_cache(maxsize=1)
def accounting_enabled() -> bool:
    """True when sacct can answer (AccountingStorageType is not accounting_storage/none)."""
    try:
        out = run(["scontrol", "show", "config"], timeout=30).stdout
    except SlurmError:
        return False
    for line in out.splitlines():
        if line.startswith("AccountingStorageType"):
            return "accounting_storage/none" not in line
    return False


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job -o ID`` as a dict (JobState, TimeLimit, Comment, StdOut, ...)."""
    out = run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
    # Values may contain spaces (Command, Comment): a value runs until the next " Key=".
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"(\w+)=(.*?)(?= [\w/:]+=|$)", out.strip())}


def squeue_states(job_ids: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """``{job_id: {"JobID", "State", "NodeList", "Reason", "RestartCount"?}}`` from squeue.

    Array members appear as ``"123_4"``. Finished jobs stay listed for MinJobAge seconds (the dev
    cluster keeps them an hour); a job absent here is unknown, not finished.
    """
    # All jobs, then filter: `squeue -j` fails outright when one listed id is already purged.
    out = run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%N|%r"], timeout=30).stdout
    wanted = None if job_ids is None else {str(j).split("_")[0] for j in job_ids}
    states: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        jid, state, nodes, reason = parts
        if wanted is not None and jid.split("_")[0] not in wanted:
            continue
        states[jid] = {"JobID": jid, "State": state, "NodeList": nodes, "Reason": reason}
    return states


def job_state(job_id: str) -> str:
    """The state of one job (``UNKNOWN`` when Slurm no longer knows it)."""
    if accounting_enabled():
        out = run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)], check=False).stdout
        lines = [s.split()[0] for s in out.splitlines() if s.strip()]
        if lines:
            return lines[0]
    return squeue_states([job_id]).get(str(job_id), {}).get("State", "UNKNOWN")


def wait_for(job_id: str, states: Iterable[str], timeout: float, poll: float = 1.0) -> str:
    """Poll until the job reaches one of ``states`` (or any final state); return the state seen."""
    want = set(states)
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in want or (state not in ACTIVE_STATES and state != "UNKNOWN"):
            return state
        time.sleep(poll)
    return state


def install_submitit_watcher() -> None:
    """Make submitit read job states from squeue when the cluster has no accounting.

    submitit (1.5) polls ``sacct`` through one shared ``SlurmJob.watcher``; its ``read_info``
    parses ``JobID|State|NodeList`` text, so we feed it the same text built from squeue.
    """
    if accounting_enabled() or isinstance(ss.SlurmJob.watcher, _SqueueWatcher):
        return
    old = ss.SlurmJob.watcher
    new = _SqueueWatcher(delay_s=old._delay_s)
    new._registered = old._registered  # keep jobs already registered in this process
    ss.SlurmJob.watcher = new


class _SqueueWatcher(ss.SlurmInfoWatcher):
    def update(self) -> None:
        to_check = {x.split("_")[0] for x in self._registered - self._finished}
        if not to_check:
            return
        self._num_calls += 1
        try:
            states = squeue_states(to_check)
        except SlurmError:
            states = {}  # slurmctld briefly unreachable: keep the old states, poll again later
        text = "JobID|State|NodeList\n" + "".join(
            f"{s['JobID']}|{s['State']}|{s['NodeList']}\n" for s in states.values())
        self._info_dict.update(self.read_info(text))
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)
