"""`hpc registry add|promote|list|show|verify|diff|export`: the model registry (see docs/registry.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hpc.util.table import format_table


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="DIR", default=None,
                        help="registry root (default: $HPC_REGISTRY or ./registry)")
    common.add_argument("--trust-plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE named by a card even if it is not installed (docs/registry.md)")
    p = sub.add_parser("registry", help="versioned, verified model artifacts: add, promote, list, "
                       "show, verify, diff, export")
    rsub = p.add_subparsers(dest="registry_cmd", metavar="ACTION")
    a = rsub.add_parser("add", parents=[common], help="register a run's model (or an ensemble)")
    a.add_argument("run_dir", nargs="?", help="run directory written by `hpc train`")
    a.add_argument("--name", required=True)
    a.add_argument("--allow-unfinished", action="store_true",
                   help="register a preempted or failed run's model anyway (refused by default)")
    a.add_argument("--from", dest="source", default="best", choices=("best", "last"),
                   help="which saved weights of the run (default: best)")
    a.add_argument("--ensemble", metavar="REFS", help="instead of RUN_DIR: comma-separated member "
                   "references (NAME@ALIAS|VERSION) pinned to their current versions")
    a.add_argument("--combine", default="mean", choices=("mean", "vote"),
                   help="how --ensemble combines its members (weighted/stacking ensembles are "
                   "registered by `hpc ensemble`)")
    a.set_defaults(func=_add)
    pr = rsub.add_parser("promote", parents=[common], help="point an alias at a version")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--alias", required=True, help="e.g. production, staging")
    pr.set_defaults(func=_promote)
    ls = rsub.add_parser("list", parents=[common], help="models, or the versions of one")
    ls.add_argument("name", nargs="?")
    ls.set_defaults(func=_list)
    sh = rsub.add_parser("show", parents=[common], help="a version's card and lineage")
    sh.add_argument("ref", help="NAME@VERSION or NAME@ALIAS")
    sh.add_argument("--json", action="store_true", help="print the whole card as JSON")
    sh.set_defaults(func=_show)
    ve = rsub.add_parser("verify", parents=[common], help="recompute every checksum")
    ve.add_argument("ref")
    ve.set_defaults(func=_verify)
    di = rsub.add_parser("diff", parents=[common], help="configs and metrics side by side")
    di.add_argument("a")
    di.add_argument("b")
    di.set_defaults(func=_diff)
    ex = rsub.add_parser("export", parents=[common], help="one self-contained graph (ONNX, TorchScript, "
                         "torch.export) with the normalization inside, verified against the registry")
    ex.add_argument("ref", help="NAME@ALIAS or NAME@VERSION (a single model or an ensemble)")
    ex.add_argument("--format", default="onnx", choices=("onnx", "torchscript", "pt2"))
    ex.add_argument("--out", required=True, metavar="DIR", help="the export directory (must not exist)")
    ex.add_argument("--quantize", choices=("int8",), default=None,
                    help="also write model.int8.onnx (onnx only), if its test accuracy holds (--max-drop)")
    ex.add_argument("--max-drop", type=float, default=1.0, metavar="PP",
                    help="int8: largest accuracy drop in percentage points (RMSE: percent increase) "
                    "that is still written (default 1)")
    ex.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: the exporter's)")
    ex.add_argument("--data", metavar="DIR", default=None, help="data directory with train/ val/ test/ "
                    "(default: the one in the model card)")
    ex.add_argument("--allow-unpromoted", action="store_true", help="accept a version no alias points to")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    ex.set_defaults(func=_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _reg(args):
    from hpc.registry import Registry

    if getattr(args, "trust_plugin", None):
        os.environ["HPC_TRUST_PLUGINS"] = ",".join(args.trust_plugin)

    return Registry(args.registry)


def _add(args) -> int:
    from hpc.registry.card import unfinished  # lazy, like _reg: keeps torch out of `hpc --help`

    reg = _reg(args)
    if bool(args.run_dir) == bool(args.ensemble):
        raise ValueError("give either RUN_DIR or --ensemble REFS (not both, not neither)")
    if args.ensemble:
        v = reg.add_ensemble(args.name, [r for r in args.ensemble.split(",") if r], args.combine)
    else:
        why = unfinished(Path(args.run_dir))
        if why is not None and not args.allow_unfinished:
            raise ValueError(f"{why}: refusing to register it; resume the run to completion "
                             "(resume=auto), or pass --allow-unfinished to register it anyway")
        if why is not None:
            print(f"WARNING: {why}; registered because of --allow-unfinished", file=sys.stderr)
        v = reg.add(args.run_dir, args.name, source=args.source)
    print(f"{reg.root}: registered {args.name}@{v}, version {v}")  # the last word is the version
    return 0


def _promote(args) -> int:
    reg = _reg(args)
    prev = reg.promote(args.name, args.version, args.alias)
    v = reg.aliases(args.name)[args.alias]
    print(f"{args.name}@{args.alias} -> {v}" + (f" (was {prev})" if prev is not None else ""))
    return 0


def _fmt_metrics(metrics: dict, limit: int = 4) -> str:
    """The headline metrics first (accuracy/rmse, val then test), then the rest; no sample counts."""
    order = {"accuracy": 0, "rmse": 0, "mae": 1, "loss": 2}
    items = []
    for si, split in enumerate(("val", "test")):
        for k, v in (metrics.get(split) or {}).items():
            if isinstance(v, (int, float)) and k != "samples":
                items.append((order.get(k, 3), si, k, f"{split}.{k}={v:.4g}"))
    return " ".join(t[-1] for t in sorted(items)[:limit])


def _headline(card: dict) -> dict:
    """split -> {metric: value}: a single model's metrics, or an ensemble's own."""
    m = card.get("metrics") or {}
    return {split: (v.get("ensemble", v) if isinstance(v, dict) else v) for split, v in m.items()}


def ensemble_tree(card: dict, card_of, _depth: int = 0) -> list[str]:
    """An ensemble card as an indented tree: members (grouped per level-0 model for stacking,
    with their weights), nested ensembles expanded, and the meta-model. ``card_of(ref)`` reads
    a member's card."""
    ens = card.get("ensemble") or {}
    members, weights = card["members"], ens.get("weights")
    groups = ens.get("groups") or [[i] for i in range(len(members))]

    def leaf(i: int) -> list[str]:
        m = members[i]
        ref = f"{m['name']}@{m['version']}"
        w = f", weight {weights[i]:.4g}" if weights else ""
        head = [f"{ref} ({m.get('family')}{w}) {_fmt_metrics(_headline(m), 2)}".rstrip()]
        if m.get("family") == "ensemble" and _depth < 8:
            head += ["  " + t for t in ensemble_tree(card_of(ref), card_of, _depth + 1)]
        return head

    method = (card.get("lineage") or {}).get("method") or ens.get("method")
    if method != ens.get("method"):
        method = f"{method} (combined: {ens.get('method')})"
    out = [f"{method} of {len(groups) if len(groups) < len(members) else len(members)}"
           + (f" x {len(groups[0])} folds" if len(groups) < len(members) else "")]
    for g, idx in enumerate(groups):
        if len(idx) > 1:
            out.append(f"  level-0 model {g} (mean of {len(idx)} fold members)")
            out += ["    " + t for i in idx for t in leaf(i)]
        else:
            out += ["  " + t for t in leaf(idx[0])]
    if ens.get("meta"):
        meta = ens["meta"]
        out.append(f"  meta-model: {meta.get('kind')} ({meta.get('in_dim')} -> {meta.get('out_dim')}, "
                   "meta.safetensors)")
    return out


def _list(args) -> int:
    reg = _reg(args)
    rows = reg.list(args.name)
    if not rows:
        print(f"no models in {reg.root}" + (f" named {args.name}" if args.name else ""))
        return 0 if not args.name else 2
    print(format_table(["name", "version", "kind", "family", "aliases", "metrics", "registered"],
                       [[r["name"], r["version"], r["kind"], r["family"], ",".join(r["aliases"]),
                         _fmt_metrics(_headline(r)), r["time"]] for r in rows]))
    return 0


def _show(args) -> int:
    reg = _reg(args)
    card = reg.card(args.ref)
    if args.json:
        print(json.dumps(card, indent=2, sort_keys=True, default=str))
        return 0
    lin, data = card.get("lineage") or {}, card.get("data") or {}
    lines = [f"{card['name']}@{card['version']}  ({card['kind']}, task {card.get('task')}; aliases: "
             f"{', '.join(card['aliases']) or 'none'}; checksums OK)",
             f"  family:          {(card.get('model') or {}).get('family')}",
             f"  config:          {json.dumps((card.get('model') or {}).get('config'), sort_keys=True)}",
             f"  metrics:         {_fmt_metrics(_headline(card))}"]
    if card["kind"] == "ensemble":
        lines.append("  tree:")
        lines += ["    " + t for t in ensemble_tree(card, reg.card)]
    else:
        lines += [f"  run directory:   {lin.get('run_dir')} (weights: {lin.get('source')})",
                  f"  data manifest:   {data.get('dir')} (sha256 {data.get('manifest_sha256')})",
                  f"  fields:          {json.dumps(card['schema'].get('fields'), sort_keys=True)}",
                  f"  trained:         world_size {lin.get('world_size')}, backend {lin.get('backend')}, "
                  f"Slurm {json.dumps(lin.get('slurm'))}, code {card.get('code_version')}, "
                  f"torch {(card.get('versions') or {}).get('torch')}"]
    reg_info = card.get("registered") or {}
    lines.append(f"  registered:      {reg_info.get('time')} by {reg_info.get('user')} on "
                 f"{reg_info.get('host')} (Slurm job {reg_info.get('slurm_job_id')})")
    print("\n".join(lines))
    return 0


def _verify(args) -> int:
    from hpc.registry import verify_dir

    reg = _reg(args)
    r = reg.resolve(args.ref)
    problems = verify_dir(reg.version_dir(r))
    for p in problems:
        print(f"FAILED {p}")
    if problems:
        print(f"{r.name}@{r.version}: {len(problems)} problem(s); do not load this version")
        return 1
    card = reg.card(r)
    for m in card.get("members") or []:
        reg.verify(f"{m['name']}@{m['version']}")
    n = sum(1 for _ in reg.version_dir(r).iterdir())
    print(f"OK {r.name}@{r.version}: {n} files match SHA256SUMS"
          + (f"; {len(card['members'])} members verified" if card.get("members") else ""))
    return 0


def _diff(args) -> int:
    from hpc.registry.card import diff_cards

    reg = _reg(args)
    a, b = reg.card(args.a), reg.card(args.b)
    rows = diff_cards(a, b)

    def cell(v):
        s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
        return s if len(s) <= 48 else s[:45] + "..."

    print(format_table(["key", f"{a['name']}@{a['version']}", f"{b['name']}@{b['version']}"],
                       [[k, cell(va), cell(vb)] for k, va, vb in rows]))
    return 0


def _export(args) -> int:
    from hpc.registry.export import ExportError, export

    try:
        export(_reg(args), args.ref, args.out, args.format, args.quantize, args.opset, args.max_drop,
               args.data, args.allow_unpromoted, args.overwrite)
    except ExportError as e:  # the graph does not match, or int8 lost too much: nothing written
        print(f"hpc registry export: FAILED: {e}", file=sys.stderr)
        return 1
    return 0
