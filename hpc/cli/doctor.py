"""`hpc doctor [--data DIR] [--json FILE]`: preflight checks, one row each (ok / warn / fail + what to do)."""

from __future__ import annotations

from pathlib import Path

from hpc.util.io import atomic_write_json


def register(sub) -> None:
    p = sub.add_parser("doctor", help="preflight: versions, MPI, Slurm, signals, /dev/shm, HDF5 locking, "
                                      "directories, kernel cache, data integrity and bandwidth, free space")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="a data set or split directory to verify and read (bandwidth)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--run-dir", type=Path, default=Path("runs"), help="where runs go (default: ./runs)")
    p.add_argument("--registry", type=Path, default=None, help="registry root (default: $HPC_REGISTRY or ./registry)")
    p.add_argument("--output", type=Path, default=None, help="an inference output root to check")
    p.add_argument("--no-mpi", action="store_true", help="skip the 2-rank all-reduce")
    p.add_argument("--mpi-ranks", type=int, default=2, help="ranks for the all-reduce check (default 2)")
    p.add_argument("--mpi-mb", type=float, default=16.0, help="all-reduce buffer size in MiB (default 16)")
    p.add_argument("--read-mb", type=float, default=256.0, help="data bytes to read for the bandwidth (default 256)")
    p.add_argument("--checksums", action="store_true", help="sha256 every shard (reads all the data)")
    p.add_argument("--min-free-gb", type=float, default=10.0, help="warn below this free space (default 10)")
    p.set_defaults(func=run)


def run(args) -> int:
    from hpc.monitor.doctor import DoctorConfig, format_rows, rows_json, run_doctor

    cfg = DoctorConfig(data=args.data, run_dir=args.run_dir, registry=args.registry, output=args.output,
                       mpi=not args.no_mpi, mpi_ranks=args.mpi_ranks, mpi_mb=args.mpi_mb, read_mb=args.read_mb,
                       checksums=args.checksums, min_free_gb=args.min_free_gb)
    rows = run_doctor(cfg)
    print(format_rows(rows))
    result = rows_json(rows)
    if args.json:
        atomic_write_json(args.json, result)
    return 0 if result["ok"] else 1
