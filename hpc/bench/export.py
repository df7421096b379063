"""`hpc bench export`: an exported graph in onnxruntime (fp32 and int8) vs the registry's torch scorer.

Measured in one run, on the same in-memory batches of raw rows (the model's evaluation split, as
``hpc registry export`` verifies on, repeated to ``--rows``): the torch scorer as ``hpc infer``
runs it per batch (``prepare``: normalization, then the model and softmax), and the ONNX graph
``hpc registry export`` writes (normalization inside) in onnxruntime, fp32 and int8
(``hpc.registry.graph.quantize_int8``). Each with 1 thread and with every core; each figure is the
best of ``--repeats`` interleaved runs. Ratios: rows/s against the torch scorer at the same thread
count, and file size against the fp32 ONNX file; ``agree``: the share of predictions equal to the
torch scorer's (classification) or ``1 - max |difference| / max(1, |value|)`` (regression).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from hpc.util.table import emit

# Heavy imports (torch ~1.6-2.3 s, onnxruntime, hpc.registry which imports torch) stay inside the
# functions: `hpc --help` imports every bench module to list it.

CORES = os.cpu_count() or 1


def register(sub) -> None:
    p = sub.add_parser("export", help="onnxruntime fp32/int8 rows/s and file sizes vs the torch scorer")
    p.add_argument("ref", help="NAME@ALIAS|VERSION (a model or an ensemble)")
    p.add_argument("--registry", default=None, help="registry root (default: $HPC_REGISTRY or ./registry)")
    p.add_argument("--allow-unpromoted", action="store_true")
    p.add_argument("--data", default=None, help="data directory with train/ val/ test/ (default: the card's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rows", type=int, default=8192, help="rows per pass (the sample, repeated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write raw figures and ratios here")
    p.set_defaults(func=run)


def _timed(fn, batches: list) -> float:
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - t0


def run(args) -> int:
    import numpy as np
    import onnxruntime as ort
    import torch

    from hpc.registry import Registry
    from hpc.registry.export import data_dir, eval_sample, read_rows
    from hpc.registry.graph import Graph, input_fields, quantize_int8, save_graph, singles

    if args.repeats < 1 or args.batch_size < 1 or args.rows < 1:
        raise ValueError("--repeats, --batch-size and --rows must be >= 1")
    reg = Registry(args.registry)
    scorer, card = reg.load_scorer(args.ref, args.allow_unpromoted)
    root = Path(args.data) if args.data else data_dir(scorer)
    sample, where = eval_sample(card, root)
    fields = input_fields(scorer, card, sample)
    reps = -(-args.rows // len(sample[fields[0]]))
    rows = {k: np.concatenate([v] * reps)[:args.rows] for k, v in sample.items()}
    batches = [{k: rows[k][a:a + args.batch_size] for k in fields} for a in range(0, args.rows, args.batch_size)]
    tmp = Path(tempfile.mkdtemp(prefix="hpc-bench-export-"))
    try:
        fp32, int8 = tmp / "model.onnx", tmp / "model.int8.onnx"
        save_graph(Graph(scorer, fields).eval(), "onnx", [sample[k][:8] for k in fields], fp32, card["task"])
        train = root / "train" if root is not None and (root / "train" / "manifest.json").is_file() else None
        calib = None
        if train is not None:
            t = read_rows(train, card["schema"], 512)
            calib = [{k: t[k][a:a + 64] for k in fields} for a in range(0, len(t[fields[0]]), 64)]
        how = quantize_int8(fp32, int8, calib)
        sizes = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
        weights = sum(f.stat().st_size for s in singles(scorer) for f in
                      reg.version_dir(reg.resolve(f"{s.card['name']}@{s.card['version']}")).glob("*.safetensors"))

        def session(path: Path, threads: int):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            return lambda b: sess.run(None, b)

        def scored(b):
            with torch.inference_mode():
                return scorer(scorer.prepare({k: torch.from_numpy(v) for k, v in b.items()}))

        outputs, best = {}, {}
        threads_default = torch.get_num_threads()
        for threads in sorted({1, CORES}):
            torch.set_num_threads(threads)
            fns = {"torch": scored, "fp32": session(fp32, threads), "int8": session(int8, threads)}
            for name, fn in fns.items():
                outputs[name] = fn(batches[0])  # warm-up (and the outputs compared below)
            for _ in range(args.repeats):  # interleaved: load from other processes favours none
                for name, fn in fns.items():
                    best[name, threads] = min(best.get((name, threads), float("inf")), _timed(fn, batches))
        torch.set_num_threads(threads_default)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ref = outputs["torch"].numpy()
    cls = card["task"] == "classification"

    def agree(out) -> float:
        if cls:
            return float((out[1] == ref.argmax(1)).mean())
        return 1.0 - float((np.abs(out[0] - ref) / np.maximum(1.0, np.abs(ref))).max())

    label = {"torch": "torch scorer (hpc infer's computation)", "fp32": "onnxruntime fp32 graph",
             "int8": f"onnxruntime int8 graph ({how.split(' (')[0]})"}
    size = {"torch": weights, "fp32": sizes["fp32"], "int8": sizes["int8"]}
    table, result = [], {"model": f"{card['name']}@{card['version']}", "rows": args.rows, "data": where,
                         "batch_size": args.batch_size, "int8_method": how, "bytes": size, "rows_per_s": {}}
    for (name, threads), sec in sorted(best.items(), key=lambda kv: (kv[0][1], list(label).index(kv[0][0]))):
        rate = args.rows / sec
        vs = rate / (args.rows / best["torch", threads])
        result["rows_per_s"][f"{name}/{threads}"] = rate
        table.append([label[name], threads, rate, vs, size[name], size[name] / sizes["fp32"],
                      1.0 if name == "torch" else agree(outputs[name])])
    result["int8_size_ratio"] = sizes["fp32"] / sizes["int8"]
    load = os.getloadavg()[0]
    result["loadavg_1min"], result["cores"] = load, CORES
    title = (f"hpc bench export: {result['model']} ({card['task']}), {args.rows} rows ({where}) in batches of "
             f"{args.batch_size}, best of {args.repeats}; {CORES} cores, load average {load:.1f} at the end")
    emit(title, ["runtime", "threads", "rows/s", "vs torch", "bytes", "vs fp32 file", "agree"], table, result,
         args.json)
    print(f"int8: {how}; {result['int8_size_ratio']:.2f}x smaller than the fp32 graph")
    return 0
