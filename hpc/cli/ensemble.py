"""`hpc ensemble train ENSEMBLE.yaml [--nproc N]`: bagging, boosting and stacking (docs/ensembles.md)."""

from __future__ import annotations

from hpc.cli._slurm_options import add_resource_options, print_or_report, resources_from_args
from hpc.train.config import CONFIG_DIR, resolve_path
from hpc.util.table import format_table


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="train ensembles of models (bagging, boosting, stacking)")
    esub = p.add_subparsers(dest="ensemble_command", metavar="ACTION")
    t = esub.add_parser("train", help="train every member one after another, register them and the ensemble",
                        description="Train an ensemble.yaml's members locally one after another (each on "
                        "--nproc ranks), register each member and the ensemble, and print every member's "
                        "and the ensemble's val/test metrics. Rerunning skips registered members.")
    t.add_argument("spec", help="ensemble YAML file, or a shipped one's name (hpc/configs/ensemble_*.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training-config overrides for every member (after the spec's), e.g. data.dir=...")
    t.add_argument("--nproc", type=int, default=1, help="ranks per member (mpiexec); default 1")
    t.add_argument("--registry", default=None, help="registry root (default: the spec's registry.root, "
                   "$HPC_REGISTRY or ./registry)")
    t.set_defaults(func=train)
    add_submit_parser(esub, "submit")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def add_submit_parser(sub, name: str) -> None:
    """`hpc ensemble submit` and its alias `hpc submit ensemble`: one parser, one function."""
    s = sub.add_parser(name, help="members as one Slurm job array (boosting: an afterok chain), "
                        "then the combiner job", description="Submit the members that can run in parallel "
                        "(bagging members, stacking folds) as one job array, boosting rounds as an afterok "
                        "chain, and the combiner job (evaluation, meta-model, ensemble registration) after "
                        "them. Resubmitting skips members that are already registered.")
    s.add_argument("spec", help="ensemble YAML file, or a shipped one's name")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides for every member")
    s.add_argument("--registry", default=None, help="registry root (default: $HPC_REGISTRY or ./registry)")
    s.add_argument("--max-parallel", type=int, default=256, help="array tasks running at once")
    add_resource_options(s)  # the same Slurm options as `hpc submit train`
    s.set_defaults(func=submit)


def train(args) -> int:
    from hpc.ensemble.driver import Runner
    from hpc.ensemble.spec import load_spec
    from hpc.registry import Registry

    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be >= 1")
    spec = load_spec(resolve_spec(args.spec))
    spec.overrides = list(spec.overrides) + list(args.overrides)
    registry = Registry(args.registry or spec.registry.root)
    res = Runner(spec, registry, nproc=args.nproc).run()
    print(results_table(res))
    return 0


def submit(args) -> int:
    from hpc.ensemble.slurm_jobs import submit_ensemble

    spec = resolve_spec(args.spec)
    registry = args.registry or load_spec_registry_root(spec)
    out = submit_ensemble(str(spec), args.overrides, resources_from_args(args), args.mode, args.dry_run, registry)
    return print_or_report(out, args)


def load_spec_registry_root(path) -> str | None:
    from hpc.ensemble.spec import load_spec

    return load_spec(path).registry.root


def resolve_spec(name: str):
    """A path, or the name of a shipped spec (``ensemble_digits_bagging`` -> hpc/configs/...)."""
    try:
        return resolve_path(name)  # the same lookup as training configs
    except ValueError:  # list the shipped ensemble specs only
        names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("ensemble_*.yaml") if not q.stem.endswith("_base")))
        raise ValueError(f"{name}: no such ensemble spec file, and not a shipped one ({names})") from None


def results_table(res) -> str:
    """Every member, the mean and best member, and the ensemble, on each evaluated split."""
    import numpy as np

    splits = list(res.metrics)
    if not splits:
        return "(no val/test split to evaluate on)"
    metric = "accuracy" if res.task == "classification" else "rmse"
    best = max if metric == "accuracy" else min
    first = res.metrics[splits[0]]
    rows = []
    for i, ref in enumerate(first["members"]):
        w = f"{res.weights[i]:.3f}" if res.weights else ""
        rows.append([ref, w] + [res.metrics[s]["members"][ref][metric] for s in splits])
    for lvl in first.get("level0") or {}:
        rows.append([f"{lvl} (fold mean)", ""] + [res.metrics[s]["level0"][lvl][metric] for s in splits])
    values = {s: [v[metric] for v in res.metrics[s]["members"].values()] for s in splits}
    rows.append(["mean member", ""] + [float(np.mean(values[s])) for s in splits])
    rows.append(["best member", ""] + [best(values[s]) for s in splits])
    rows.append([f"ENSEMBLE {res.method} ({res.ensemble_ref or 'ensemble.json'})", ""]
                + [res.metrics[s]["ensemble"][metric] for s in splits])
    return format_table(["model", "weight"] + [f"{s} {metric}" for s in splits], rows)
