"""`hpc data shard|synth|index|verify`: write, describe and check HDF5 shard sets (docs/data.md).

Long work reports rows done/total, rows/s and ETA on stderr (a bar on a terminal, else a line
every HPC_PROGRESS_S seconds; ``hpc.util.progress``); stdout keeps the summaries."""

from __future__ import annotations

import sys

DEFAULT_SPLIT = "train=0.8,val=0.1,test=0.1"


def _writer_args(p) -> None:
    p.add_argument("--out", required=True, help="output directory; writes OUT/<split>/shard-*.h5 + manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=65536, help="samples per shard file (default 65536)")
    p.add_argument("--compression", default="none", help="none | gzip | lzf (default none: fastest reads)")
    p.add_argument("--split", default=None,
                   help=f"NAME=FRACTION,... (default {DEFAULT_SPLIT}; an unlabeled table: all=1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split assignment (and of synthetic data)")
    p.add_argument("--on-bad-rows", default=None, choices=("drop", "error", "impute"),
                   help="rows with NaN/Inf (a table: missing cells): drop (counted, recorded; the default) | "
                        "error | impute (tables only, and their default: the training split's median/mode "
                        "plus a missing-indicator column)")
    p.add_argument("--store-dtype", default=None, metavar="DTYPE",
                   help="dtype of the features x on disk: uint8 | int8 | uint16 | int16 (values must be "
                        "integers in range) | float16 | bfloat16 (rounded; in range) | float32 (default); "
                        "readers yield float32 either way")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set in OUT/<split>")


def register(sub) -> None:
    p = sub.add_parser("data", help="write, index and verify HDF5 shard sets")
    dsub = p.add_subparsers(dest="data_cmd", metavar="ACTION")

    s = dsub.add_parser("shard", help="shard .npz / tables (.csv, .parquet) / sklearn:NAME data into checksummed HDF5 shards")
    s.add_argument("--from", dest="source", required=True,
                   help="PATH.npz (arrays --x and --label), PATH.npy (features; labels in <label>.npy "
                        "beside it), a table: PATH.csv, PATH.parquet or a directory of them (label column "
                        "--label) or sklearn:digits|breast_cancer|wine|iris|diabetes")
    s.add_argument("--label", default=None,
                   help="label array (npz/npy, default y) or column (tables: default 'label' if there is "
                        "one, else the table is unlabeled)")
    s.add_argument("--x", dest="x_key", default="x", help="feature array name in a .npz (default x)")
    s.add_argument("--task", default=None, help="classification | regression (default: from the label dtype)")
    s.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="the number of classes: integer labels outside 0..N-1 are refused (default: max + 1)")
    t = s.add_argument_group("tables (.csv, .parquet, or a directory of them; docs/data.md#tables)")
    t.add_argument("--id", dest="ids", action="append", default=[], metavar="COL",
                   help="an id column: kept out of the features, copied into every prediction row "
                        "(repeatable; columns named id or *_id are ids too, unless --no-auto-id)")
    t.add_argument("--no-auto-id", action="store_true", help="columns named id / *_id are features unless --id")
    t.add_argument("--labels", default=None, metavar="A,B,...",
                   help="the classes in index order; a label outside them is refused (default: the "
                        "sorted text labels, or integer labels as indices)")
    t.add_argument("--max-onehot", type=int, default=32, metavar="K",
                   help="text columns with at most K training categories are one-hot, others hashed (default 32)")
    t.add_argument("--hash-buckets", type=int, default=64, metavar="B", help="buckets of a hashed text column (default 64)")
    t.add_argument("--transform", default=None, metavar="SPLIT_DIR",
                   help="apply the transform recorded in this split's manifest (e.g. data/t/train) instead of "
                        "fitting one: shard new rows exactly as the training rows were")
    _writer_args(s)
    s.set_defaults(func=run_shard)

    y = dsub.add_parser("synth", help="generate a synthetic data set of any size (constant memory)")
    y.add_argument("--kind", required=True, help="tabular | images | ratings")
    y.add_argument("--samples", type=int, required=True)
    y.add_argument("--classes", type=int, default=10)
    y.add_argument("--features", type=int, default=32, help="tabular: features per sample")
    y.add_argument("--channels", type=int, default=3, help="images: C")
    y.add_argument("--size", type=int, default=32, help="images: H = W")
    y.add_argument("--noise", type=float, default=0.5,
                   help="images: pixel noise std; ratings: rating noise std (the RMSE floor); tabular: label-score noise")
    y.add_argument("--users", type=int, default=1000)
    y.add_argument("--items", type=int, default=500)
    y.add_argument("--rank", type=int, default=8, help="ratings: rank of the true preference matrix")
    _writer_args(y)
    y.set_defaults(func=run_synth)

    i = dsub.add_parser("index", help="write a manifest for existing HDF5 files (no copy)")
    i.add_argument("dir", help="directory holding the .h5/.hdf5 files; the manifest is written here")
    i.add_argument("--x", help="dataset path of the features, e.g. /images")
    i.add_argument("--y", help="dataset path of the labels/targets")
    i.add_argument("--field", action="append", default=[], metavar="NAME=PATH",
                   help="other fields, e.g. user=/u item=/i rating=/r (repeatable)")
    i.add_argument("--files", nargs="*", default=None, help="files (default: DIR/*.h5 DIR/*.hdf5, sorted)")
    i.add_argument("--task", default=None, help="classification | regression | ratings (default: inferred)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    i.set_defaults(func=run_index)

    v = dsub.add_parser("verify", help="check every shard against its manifest (sha256, size, schema, counts)")
    v.add_argument("dir", help="a split directory (with manifest.json) or a data set with split subdirectories")
    v.add_argument("--quick", action="store_true", help="skip sha256 (presence, size, schema, counts only)")
    v.set_defaults(func=run_verify)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _writer_cfg(args):
    from hpc.data.writer import WriterConfig

    return WriterConfig(samples_per_shard=args.samples_per_shard, compression=args.compression,
                        on_bad_rows="error" if args.on_bad_rows == "error" else "drop", overwrite=args.overwrite,
                        store_dtype=args.store_dtype)


def _summary(manifests) -> None:
    for name, m in manifests.items():
        size = sum(s.bytes for s in m.shards)
        dropped = m.bad_rows.get("dropped", 0)
        print(f"{m.path}: {m.total_samples} samples in {len(m.shards)} shard(s), {size / 1e6:.1f} MB"
              + (f", dropped {dropped} row(s) with NaN/Inf" if dropped else ""))


def run_shard(args) -> int:
    from hpc.data.sources import shard_source
    from hpc.data.tablefiles import is_table_input

    if not args.source.startswith("sklearn:") and is_table_input(args.source):
        return _shard_table(args)
    if args.on_bad_rows == "impute":
        raise ValueError("--on-bad-rows impute fills missing cells of tables (CSV/Parquet); for arrays "
                         "use drop or error")
    table_only = [f for f, v in (("--id", args.ids), ("--no-auto-id", args.no_auto_id), ("--labels", args.labels),
                                 ("--transform", args.transform)) if v]
    if table_only:
        raise ValueError(f"{', '.join(table_only)}: options of tables (.csv, .parquet); {args.source} is not one")
    _summary(shard_source(args.source, args.out, split=args.split, seed=args.seed, config=_writer_cfg(args),
                          label=args.label or "y", x_key=args.x_key, task=args.task, progress=True,
                          num_classes=args.num_classes))
    return 0


def _shard_table(args) -> int:
    from hpc.data.manifest import load_manifest
    from hpc.data.sources import shard_source
    from hpc.data.tablefiles import read_schema, table_files
    from hpc.data.tabular import TableOptions, describe

    transform, label = None, args.label
    if args.transform:
        given = [flag for flag, v in (("--label", args.label), ("--id", args.ids), ("--labels", args.labels),
                                      ("--num-classes", args.num_classes), ("--task", args.task)) if v]
        if given:
            raise ValueError(f"--transform applies a recorded transform (label, ids, classes, encodings); "
                             f"drop {', '.join(given)}")
        transform = load_manifest(args.transform).table
        if not transform:
            raise ValueError(f"{args.transform}: its manifest records no table transform (not sharded from "
                             "a CSV/Parquet table)")
    elif label is None and "label" in read_schema(table_files(args.source)[0]).names:
        label = "label"
    labels = tuple(v.strip() for v in args.labels.split(",")) if args.labels else None
    opts = TableOptions(label=label, ids=tuple(args.ids), auto_ids=not args.no_auto_id, task=args.task,
                        num_classes=args.num_classes, labels=labels, max_onehot=args.max_onehot,
                        hash_buckets=args.hash_buckets, missing=args.on_bad_rows or "impute")
    manifests = shard_source(args.source, args.out, split=args.split, seed=args.seed, config=_writer_cfg(args),
                             table=opts, transform=transform, progress=True)
    first = next(iter(manifests.values()))
    if transform is not None:
        print(f"applied the table transform recorded in {args.transform} (x of {len(transform['x_columns'])} "
              f"values); {'labeled' if first.labeled else 'unlabeled: no label column'}")
    else:
        for line in describe(first.table):
            print(line)
        if not first.labeled:
            print("  (no --label given and no column named 'label'; --label COL names the label column)")
    if first.task == "classification":
        counts = [sum(c) for c in zip(*(m.class_counts for m in manifests.values()))]
        empty = [i for i, c in enumerate(counts) if not c]
        if empty:
            print(f"note: {len(empty)} of the {len(counts)} classes have no rows (e.g. {empty[:5]}); state the "
                  "classes with --num-classes N or --labels a,b,c if that is not what you meant")
    _summary(manifests)
    return 0


def run_synth(args) -> int:
    from hpc.data.synth import SynthConfig, synth

    cfg = SynthConfig(kind=args.kind, samples=args.samples, seed=args.seed, classes=args.classes,
                      features=args.features, channels=args.channels, size=args.size, noise=args.noise,
                      users=args.users, items=args.items, rank=args.rank)
    _summary(synth(cfg, args.out, split=args.split or DEFAULT_SPLIT, writer=_writer_cfg(args), progress=True))
    return 0


def run_index(args) -> int:
    from hpc.data.index import index_hdf5

    fields = {}
    for name, path in (("x", args.x), ("y", args.y)):
        if path:
            fields[name] = path
    for spec in args.field:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--field {spec!r}: expected NAME=DATASET_PATH")
        fields[name] = path
    m = index_hdf5(args.dir, fields, files=args.files, task=args.task, overwrite=args.overwrite, progress=True)
    _summary({"": m})
    return 0


def run_verify(args) -> int:
    from hpc.data.verify import verify_tree

    problems, checked = verify_tree(args.dir, checksums=not args.quick, progress=True)
    for line in problems:
        print(line)
    print(f"{'FAILED' if problems else 'OK'}: {checked} shard(s) checked, {len(problems)} problem(s)",
          file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0
