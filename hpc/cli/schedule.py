"""`hpc schedule infer|list|remove`: scheduled batch scoring through Slurm's scrontab (docs/slurm.md)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("schedule", help="batch scoring on a cron cadence (Slurm scrontab)")
    ssub = p.add_subparsers(dest="what", metavar="WHAT")
    i = ssub.add_parser("infer", help="score the new drops of a landing zone (or a whole split) with MODEL "
                                      "on a schedule")
    i.add_argument("--cron", required=True,
                   help="5-field cron expression as scrontab takes it, e.g. '0 2 * * *' (daily at 02:00), "
                        "'*/15 * * * 1-5', or @hourly|@daily|@midnight|@weekly|@monthly|@yearly|@annually")
    i.add_argument("--model", required=True, help="NAME@ALIAS (re-resolved at every run) or NAME@VERSION")
    i.add_argument("--input", required=True, metavar="DIR",
                   help="a landing zone: each run scores only the Parquet/CSV files and shard-set directories "
                        "(with manifest.json) not scored yet or changed, one output each under ROOT/scored/, "
                        "listed in ROOT/_INDEX.json; or a split (manifest.json) or file, re-scored whole into "
                        "ROOT/<run>/ with ROOT/latest pointing at the newest complete run")
    i.add_argument("--output", required=True, metavar="ROOT")
    i.add_argument("--name", default=None, help="schedule name (default: the model name)")
    i.add_argument("--registry", default=None, metavar="DIR",
                   help="registry root (default: $HPC_REGISTRY or ./registry)")
    i.add_argument("--tasks-per-node", type=int, default=1)
    i.add_argument("--time", default="1:00:00")
    i.add_argument("--partition", default=None)
    i.add_argument("--account", default=None)
    i.add_argument("--qos", default=None)
    i.add_argument("--mem", default=None)
    i.add_argument("--run-now", action="store_true",
                   help="also submit one run now through sbatch (same options and command)")
    i.set_defaults(func=_infer)
    ls = ssub.add_parser("list", help="the schedules in your scrontab")
    ls.set_defaults(func=_list)
    rm = ssub.add_parser("remove", help="remove a schedule")
    rm.add_argument("name")
    rm.set_defaults(func=_remove)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _infer(args) -> int:
    from hpc.launch.sbatch import SlurmResources
    from hpc.launch.schedule import Schedule, describe_cron, describe_input, install, now, run_now

    res = SlurmResources(tasks_per_node=args.tasks_per_node, time=args.time, partition=args.partition,
                         account=args.account, qos=args.qos, mem=args.mem)
    name = args.name or args.model.split("@", 1)[0]
    s = Schedule(name=name, cron=args.cron, model=args.model, input=args.input, output=args.output, res=res,
                 registry=args.registry).check()
    print(install(s))
    print(f"each run: {describe_input(s)}")
    print(f"schedule {s.name!r}: {describe_cron(s.cron, now())}")
    if args.run_now:
        print(f"submitted one run now: job {run_now(s)} (logs in {s.output}/.logs/)")
    return 0


def _list(args) -> int:
    from hpc.launch.schedule import block_cron, describe_cron, list_schedules, now

    blocks = list_schedules()
    if not blocks:
        print("no hpc schedules in your scrontab")
    for name, block in blocks.items():
        try:
            when = describe_cron(block_cron(block), now())
        except ValueError as e:  # an entry edited by hand: still list it, with what is wrong
            when = str(e)
        print(f"{name}: {when}\n{block}")
    return 0


def _remove(args) -> int:
    from hpc.launch.schedule import remove

    print(remove(args.name))
    return 0
