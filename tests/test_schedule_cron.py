"""`hpc schedule` cron expressions: what scrontab takes, the next run times, and the crontab line cron runs."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from hpc.cli import main
from hpc.launch import schedule
from hpc.launch.sbatch import SlurmResources


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("expr,normal", [
    ("0 2 * * *", "0 2 * * *"),
    ("*/15 * * * 1-5", "*/15 * * * 1-5"),
    ("0 0 1 jan *", "0 0 1 jan *"),        # a lone month name, as scrontab takes it
    ("0 0 1 1,7 *", "0 0 1 1,7 *"),
    ("30 6 * * SUN", "30 6 * * sun"),
    ("0-30/10 */6 1-31/2 */3 0,7", "0-30/10 */6 1-31/2 */3 0,7"),
    ("0 0 * * 1-5/2", "0 0 * * 1-5/2"),     # both count from Monday: 1,3,5
    (" 5  4 * * 0 ", "5 4 * * 0"),
    ("@daily", "@daily"),
    ("@HOURLY", "@hourly"),                # scrontab reads nicknames in any case, cron only in lower case
])
def test_validate_cron_accepts_what_scrontab_takes(expr, normal):
    assert schedule.validate_cron(expr) == normal


@pytest.mark.parametrize("expr,named", [
    ("61 25 * * *", ["minute '61'", "(minute: 0-59)", "hour '25'", "(hour: 0-23)"]),
    ("a b c d e", ["minute 'a'", "hour 'b'", "day-of-month 'c'", "month 'd'", "day-of-week 'e'"]),
    ("*/0 * * * *", ["minute '*/0'", "step 0", "steps 2-60"]),
    ("* * 32 13 8", ["day-of-month '32'", "(day-of-month: 1-31)", "month '13'", "1-12", "day-of-week '8'", "0-7"]),
    ("0 0 2 * * *", ["6 fields", "no seconds"]),
    ("@reboot", ["no @reboot", "@daily"]),
    ("@sometimes", ["unknown nickname", "@hourly"]),
    ("* * * *", ["4 fields", "minute hour day-of-month month day-of-week"]),
    ("", ["0 fields"]),
    # scrontab's parser takes a month or day name only alone (src/scrontab/parse.c)
    ("0 0 1 jan,jul *", ["month 'jan,jul'", "name only on its own", "1-12"]),
    ("0 0 * * mon-fri", ["day-of-week 'mon-fri'", "name only on its own"]),
    # cron extensions cronsim takes and scrontab does not
    ("0 0 L * *", ["day-of-month 'l'", "1-31"]),
    ("0 0 * * 5#2", ["day-of-week '5#2'"]),
    ("*,5 * * * *", ["minute '*,5'"]),
    # where scrontab and cron would run at different times
    ("*/1 * * * *", ["step 1", "write *"]),
    ("5-30/10 * * * *", ["minute '5-30/10'", "from 0, cron from 5"]),
    ("0 0 * * */2", ["day-of-week '*/2'", "from Monday, cron from Sunday"]),
    ("0 0 * * 0-6/2", ["day-of-week '0-6/2'", "from 1, cron from 0"]),
    ("0 0 */2 * 1", ["day-of-month '*/2' with day-of-week '1'"]),
    ("0 0 jan/2 * *", ["day-of-month 'jan/2'"]),
    ("0 0 31 2 *", ["day-of-month '31' never occurs in month '2'"]),
])
def test_validate_cron_refuses_naming_field_value_and_range(expr, named):
    with pytest.raises(ValueError, match="--cron") as e:
        schedule.validate_cron(expr)
    for part in named:
        assert part in str(e.value), (part, str(e.value))


# ------------------------------------------------------------------------------- next runs
@pytest.mark.parametrize("expr,after,runs", [
    ("0 2 * * *", "2026-01-01 12:00", ["2026-01-02 02:00", "2026-01-03 02:00", "2026-01-04 02:00"]),
    # Friday 23:50: the next weekday quarter hours are Monday's
    ("*/15 * * * 1-5", "2026-01-02 23:50", ["2026-01-05 00:00", "2026-01-05 00:15", "2026-01-05 00:30"]),
    ("0 0 1 1,7 *", "2026-03-01 00:00", ["2026-07-01 00:00", "2027-01-01 00:00", "2027-07-01 00:00"]),
    ("0 0 1 jan *", "2026-03-01 00:00", ["2027-01-01 00:00", "2028-01-01 00:00", "2029-01-01 00:00"]),
    ("@daily", "2026-01-01 00:00", ["2026-01-02 00:00", "2026-01-03 00:00", "2026-01-04 00:00"]),  # strictly after
    ("@weekly", "2026-01-01 00:00", ["2026-01-04 00:00", "2026-01-11 00:00", "2026-01-18 00:00"]),  # Sundays
])
def test_next_runs_from_a_fixed_time(expr, after, runs):
    got = schedule.next_runs(expr, datetime.fromisoformat(after))
    assert [t.strftime("%Y-%m-%d %H:%M") for t in got] == runs


def test_next_runs_in_a_zone_follow_dst():
    berlin = ZoneInfo("Europe/Berlin")
    got = schedule.next_runs("0 12 * * *", datetime(2026, 3, 27, 13, 0, tzinfo=berlin))
    assert got == [datetime(2026, 3, 28, 12, tzinfo=berlin), datetime(2026, 3, 29, 12, tzinfo=berlin),
                   datetime(2026, 3, 30, 12, tzinfo=berlin)]
    assert [t.utcoffset().total_seconds() / 3600 for t in got] == [1, 2, 2]  # CET, then CEST


@pytest.fixture
def berlin_tz(monkeypatch):
    """This process's local time zone is Central European for the test (a POSIX rule: no tz database needed)."""
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_describe_cron_shows_local_times_with_zone(berlin_tz):
    text = schedule.describe_cron("0 12 * * *", datetime(2026, 3, 27, 13, 0))
    assert text.splitlines() == ["0 12 * * * (At 12:00 every day); next 3 runs (local time):",
                                 "  Sat 2026-03-28 12:00 CET (UTC+0100)",
                                 "  Sun 2026-03-29 12:00 CEST (UTC+0200)",
                                 "  Mon 2026-03-30 12:00 CEST (UTC+0200)"]


def test_block_cron_reads_back_the_entry():
    for cron in ("0 2 * * *", "@daily"):
        s = schedule.Schedule("n", cron, "m@1", "/i", "/o", cwd="/w", python="/py").check()
        assert schedule.block_cron(schedule.render_block(s)) == cron


# ------------------------------------------------------------------------------- the CLI
def _fake_bin(tmp_path, name: str, body: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + body)
    (bin_dir / name).chmod(0o755)
    return bin_dir


def _infer_args(tmp_path, cron):
    return ["schedule", "infer", "--cron", cron, "--model", "digits@production", "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--registry", str(tmp_path / "reg"), "--name", "nightly"]


NEXT_RUNS = ["schedule 'nightly': 0 12 * * * (At 12:00 every day); next 3 runs (local time):",
             "  Sat 2026-03-28 12:00 CET (UTC+0100)",
             "  Sun 2026-03-29 12:00 CEST (UTC+0200)",
             "  Mon 2026-03-30 12:00 CEST (UTC+0200)"]


def test_cli_prints_next_runs_with_the_crontab_fallback(tmp_path, monkeypatch, capsys, berlin_tz):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scrontab: the "not installed" fallback
    monkeypatch.setattr(schedule, "now", lambda: datetime(2026, 3, 27, 13, 0))
    assert main(_infer_args(tmp_path, "0 12 * * *")) == 0
    out = capsys.readouterr().out
    assert "not installed: `scrontab` is not installed" in out and "\n0 12 * * * sbatch " in out
    assert out.splitlines()[-4:] == NEXT_RUNS


def test_cli_prints_next_runs_when_installed_and_listed(tmp_path, monkeypatch, capsys, berlin_tz):
    store = tmp_path / "scrontab.txt"
    bin_dir = _fake_bin(tmp_path, "scrontab", f'if [ "$1" = -l ]; then cat {store} 2>/dev/null; exit 0; fi\n'
                                              f'cp "$1" {store}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(schedule, "now", lambda: datetime(2026, 3, 27, 13, 0))
    assert main(_infer_args(tmp_path, "0 12 * * *")) == 0
    out = capsys.readouterr().out
    assert out.startswith("installed schedule 'nightly' (0 12 * * *)") and out.splitlines()[-4:] == NEXT_RUNS
    assert main(["schedule", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[:4] == [ln.replace("schedule 'nightly'", "nightly")
                                                         for ln in NEXT_RUNS]


@pytest.mark.parametrize("cron,named", [("61 25 * * *", "minute '61' is not valid (minute: 0-59)"),
                                        ("@reboot", "no @reboot")])
def test_cli_refuses_invalid_cron_with_exit_2(tmp_path, monkeypatch, capsys, cron, named):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(_infer_args(tmp_path, cron)) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpc schedule: error: --cron") and named in err


# ------------------------------------------------------------------------------- the crontab line
def _as_cron_runs_it(line: str) -> tuple[str, str]:
    """What cron does with a 5-field crontab line: the command for ``sh -c`` and its stdin.

    crontab(5): an unescaped % ends the command (the rest, with % turned into newlines, is stdin)
    and \\% stands for a plain %.
    """
    command, escaped = [], False
    rest = line.split(None, 5)[5]
    for k, ch in enumerate(rest):
        if escaped:
            command.append(ch if ch == "%" else "\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            return "".join(command), rest[k + 1:].replace("%", "\n")
        else:
            command.append(ch)
    return "".join(command) + ("\\" if escaped else ""), ""


def test_crontab_line_reaches_sbatch_intact_through_cron(tmp_path):
    """Issue 17: cron cut the line at --output=.../%j.out and sbatch got no --wrap."""
    s = schedule.Schedule(name="nightly", cron="0 2 * * *", model="digits@production",
                          input=str(tmp_path / "in 100%"), output=str(tmp_path / "out"),
                          res=SlurmResources(tasks_per_node=2, time="30", partition="debug"),
                          cwd=str(tmp_path / "work dir"), python="/venv/bin/python").check()
    record = tmp_path / "argv"
    bin_dir = _fake_bin(tmp_path, "sbatch", f"printf '%s\\0' \"$@\" > {record}\n")
    line = schedule.crontab_line(s)
    assert line.startswith("0 2 * * * sbatch --job-name=hpc-sched-nightly ")
    command, stdin = _as_cron_runs_it(line)
    proc = subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().split("\0")[:-1]
    assert argv == [*schedule.sbatch_options(s), "--wrap", schedule.runner_command(s)]
    assert f"--output={tmp_path}/out/.logs/%j.out" in argv and "in 100%" in argv[-1]
