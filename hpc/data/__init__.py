"""Data layer: checksummed HDF5 shards + manifest, and a streaming, per-rank, resumable reader.

See docs/data.md. The contract (docs/DESIGN.md, ``hpc.data``) is what this package exports.
"""

from hpc.data.augment import Augment
from hpc.data.index import index_hdf5
from hpc.data.manifest import FieldSpec, Manifest, ShardInfo, check_schema, load_manifest
from hpc.data.partition import assign_shards, batches_per_epoch, rank_bounds
from hpc.data.reader import ShardReadError, StreamingReader, check_shards, iter_shard
from hpc.data.shuffle import rank_order, rank_plan
from hpc.data.sources import shard_source
from hpc.data.synth import SynthConfig, synth
from hpc.data.verify import verify, verify_tree
from hpc.data.writer import ShardWriter, WriterConfig

__all__ = [
    "Augment", "FieldSpec", "Manifest", "ShardInfo", "ShardReadError", "ShardWriter",
    "StreamingReader", "SynthConfig", "WriterConfig", "assign_shards", "batches_per_epoch",
    "check_schema", "check_shards", "index_hdf5", "iter_shard", "load_manifest", "rank_bounds",
    "rank_order", "rank_plan", "shard_source", "synth", "verify", "verify_tree",
]
