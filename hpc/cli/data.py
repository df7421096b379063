"""`hpc data shard|synth|index|verify`: write, describe and check HDF5 shard sets (docs/data.md).

Long work reports rows done/total, rows/s and ETA on stderr (a bar on a terminal, else a line
every HPC_PROGRESS_S seconds; ``hpc.util.progress``); stdout keeps the summaries."""

from __future__ import annotations

import sys


def _writer_args(p) -> None:
    p.add_argument("--out", required=True, help="output directory; writes OUT/<split>/shard-*.h5 + manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=65536, help="samples per shard file (default 65536)")
    p.add_argument("--compression", default="none", help="none | gzip | lzf (default none: fastest reads)")
    p.add_argument("--split", default="train=0.8,val=0.1,test=0.1", help="NAME=FRACTION,... (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split assignment (and of synthetic data)")
    p.add_argument("--on-bad-rows", default="drop", help="rows with NaN/Inf: drop (counted, recorded) | error")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set in OUT/<split>")


def register(sub) -> None:
    p = sub.add_parser("data", help="write, index and verify HDF5 shard sets")
    dsub = p.add_subparsers(dest="data_cmd", metavar="ACTION")

    s = dsub.add_parser("shard", help="shard .npz / .csv / sklearn:NAME data into checksummed HDF5 shards")
    s.add_argument("--from", dest="source", required=True,
                   help="PATH.npz (arrays --x and --label), PATH.npy (features; labels in <label>.npy "
                        "beside it), PATH.csv (label column --label) or sklearn:digits|breast_cancer|wine|iris")
    s.add_argument("--label", default=None,
                   help="label array (npz/npy, default y) or column (csv, default label)")
    s.add_argument("--x", dest="x_key", default="x", help="feature array name in a .npz (default x)")
    s.add_argument("--task", default=None, help="classification | regression (default: from the label dtype)")
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
                        on_bad_rows=args.on_bad_rows, overwrite=args.overwrite)


def _summary(manifests) -> None:
    for name, m in manifests.items():
        size = sum(s.bytes for s in m.shards)
        dropped = m.bad_rows.get("dropped", 0)
        print(f"{m.path}: {m.total_samples} samples in {len(m.shards)} shard(s), {size / 1e6:.1f} MB"
              + (f", dropped {dropped} row(s) with NaN/Inf" if dropped else ""))


def run_shard(args) -> int:
    from hpc.data.sources import shard_source

    label = args.label or ("label" if args.source.lower().endswith((".csv", ".txt")) else "y")
    _summary(shard_source(args.source, args.out, split=args.split, seed=args.seed, config=_writer_cfg(args),
                          label=label, x_key=args.x_key, task=args.task, progress=True))
    return 0


def run_synth(args) -> int:
    from hpc.data.synth import SynthConfig, synth

    cfg = SynthConfig(kind=args.kind, samples=args.samples, seed=args.seed, classes=args.classes,
                      features=args.features, channels=args.channels, size=args.size, noise=args.noise,
                      users=args.users, items=args.items, rank=args.rank)
    _summary(synth(cfg, args.out, split=args.split, writer=_writer_cfg(args), progress=True))
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
