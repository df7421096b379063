"""`hpc version`: the suite's and its dependencies' versions (also `hpc --version`)."""

from __future__ import annotations

import json

from hpc.util.versions import code_version, versions


def register(sub) -> None:
    p = sub.add_parser("version", help="print the versions of hpc and its dependencies")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    info = versions()
    info["code"] = code_version() or "unknown"
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:12s} {v}")
    return 0
