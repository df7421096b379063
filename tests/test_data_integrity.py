"""Training verifies the shards it reads (hpc.data.integrity): each fault of issue 17 item 3, which
trained to exit 0 before, now stops before any rank trains or at the next verification point,
naming the shard."""

from __future__ import annotations

import json
import os
import shutil
import threading

import h5py
import numpy as np
import pytest

from hpc.data import StreamingReader, SynthConfig, WriterConfig, load_manifest, synth
from hpc.data.integrity import ShardIntegrityError, check_split
from hpc.data.shardio import ShardReadError
from hpc.train.config import TrainConfig, load_config
from hpc.train.runner import preflight
from hpc.util.io import sha256_file

from _data_util import record_verifiers as _verifiers


@pytest.fixture
def data(tmp_path):
    synth(SynthConfig(kind="tabular", samples=600, features=6, classes=3, seed=1), tmp_path / "d",
          split="train=0.8,val=0.2", writer=WriterConfig(samples_per_shard=120))
    return tmp_path / "d"


def _edit_manifest(split, fn) -> None:
    p = split / "manifest.json"
    obj = json.loads(p.read_text())
    fn(obj)
    obj["total_samples"] = sum(s["samples"] for s in obj["shards"])
    p.write_text(json.dumps(obj))


def _cfg(d) -> TrainConfig:
    return load_config({"data": {"dir": str(d), "batch_size": 20}, "model": {"family": "mlp",
                                  "config": {"widths": [8]}}})


def _epoch(split, epoch: int = 0, **kw) -> int:
    r = StreamingReader(split, 0, 1, 16, **kw)
    r.set_epoch(epoch)
    return sum(1 for _ in r)


def _x_offset(path) -> int:
    with h5py.File(path, "r") as f:
        ds = f["/x"]
        return ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset


def test_clean_split_passes_preflight_and_reads(data):
    preflight(_cfg(data), 1)
    assert _epoch(data / "train") == 480 // 16


def test_flipped_byte_in_x_stops_the_epoch_naming_the_shard(data):
    p = data / "train" / "shard-00002.h5"
    off = _x_offset(p) + 5
    with open(p, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    preflight(_cfg(data), 1)  # no hashing at start-up: the size and the structure are intact
    with pytest.raises(ShardIntegrityError, match=r"shard-00002\.h5: sha256 .* does not match"):
        _epoch(data / "train")
    assert _epoch(data / "train", verify=False) == 30  # what happened before: trained on it


def test_flipped_byte_in_x_fails_hpc_train(data, tmp_path):
    from hpc.train import run

    p = data / "train" / "shard-00000.h5"
    raw = bytearray(p.read_bytes())
    raw[_x_offset(p) + 3] ^= 0x01
    p.write_bytes(bytes(raw))
    cfg = {"name": "i", "out_dir": str(tmp_path / "runs"), "data": {"dir": str(data), "batch_size": 20},
           "model": {"family": "mlp", "config": {"widths": [8]}}, "train": {"epochs": 2, "progress": False}}
    with pytest.raises(Exception, match=r"shard-00000\.h5: sha256"):
        run(cfg, [])


@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_shard_replaced_by_another_is_refused(data, how):
    a, b = data / "train" / "shard-00001.h5", data / "train" / "shard-00000.h5"
    a.unlink()
    if how == "symlink":
        a.symlink_to(b.name)
        with pytest.raises(ValueError, match=r"shard-00001\.h5: a symlink"):
            preflight(_cfg(data), 1)
        return
    shutil.copyfile(b, a)
    if os.path.getsize(a) != load_manifest(data / "train").shards[1].bytes:
        with pytest.raises(ValueError, match=r"shard-00001\.h5: size"):
            preflight(_cfg(data), 1)
        return
    with pytest.raises(ShardIntegrityError, match=r"shard-00001\.h5: sha256"):  # same size: the hash sees it
        _epoch(data / "train")


def test_manifest_listing_a_shard_twice_is_refused(data):
    _edit_manifest(data / "train", lambda o: o["shards"].__setitem__(1, dict(o["shards"][0])))
    with pytest.raises(ValueError, match=r"shard 1 \(shard-00000\.h5\) is the same file as shard 0"):
        preflight(_cfg(data), 1)
    with pytest.raises(ValueError, match="same file"):
        StreamingReader(data / "train", 0, 1, 16)


def test_duplicate_content_same_sha256_is_refused(data):
    def dup(o):
        o["shards"][2]["sha256"] = o["shards"][1]["sha256"]
    _edit_manifest(data / "train", dup)
    with pytest.raises(ValueError, match=r"shard 2 .* same sha256 as shard 1 .*duplicate content"):
        preflight(_cfg(data), 1)


def test_lowered_row_count_is_refused(data):
    _edit_manifest(data / "train", lambda o: o["shards"][0].__setitem__("samples", o["shards"][0]["samples"] - 7))
    with pytest.raises(ValueError, match=r"shard-00000\.h5:/x has 120 rows, manifest says 113"):
        preflight(_cfg(data), 1)


@pytest.mark.parametrize("file", ["../../other/train/shard-00000.h5", "ABS"])
def test_paths_outside_the_data_directory_are_refused(data, tmp_path, file):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    if file == "ABS":
        file = str(other / "train" / "shard-00000.h5")
    _edit_manifest(data / "train", lambda o: o["shards"][0].__setitem__("file", file))
    with pytest.raises(ValueError, match="leaves the split directory|absolute path"):
        preflight(_cfg(data), 1)


def test_symlinked_directory_leading_outside_is_refused(data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data / "train", other)
    (data / "train" / "sub").symlink_to(other)
    _edit_manifest(data / "train", lambda o: o["shards"][0].__setitem__("file", "sub/shard-00000.h5"))
    with pytest.raises(ValueError, match="outside the split directory"):
        preflight(_cfg(data), 1)
    with pytest.raises(ValueError, match="outside the split directory"):
        check_split(load_manifest(data / "train"))


def test_out_of_range_label_names_file_and_row(data):
    split = data / "train"
    p = split / "shard-00003.h5"
    with h5py.File(p, "r+") as f:
        f["/y"][17] = 16777222
    # The manifest recorded as if sharded this way (no checksum mismatch): the label check names it.
    _edit_manifest(split, lambda o: o["shards"][3].update(sha256=sha256_file(p), bytes=os.path.getsize(p)))
    with pytest.raises(ShardReadError, match=r"shard-00003\.h5: row 17 .*label 16777222 is outside the classes 0\.\.2"):
        _epoch(split)
    with h5py.File(p, "r+") as f:
        f["/y"][17] = -1
    _edit_manifest(split, lambda o: o["shards"][3].update(sha256=sha256_file(p), bytes=os.path.getsize(p)))
    with pytest.raises(ShardReadError, match=r"row 17 .*label -1 is outside"):
        _epoch(split, shuffle=False, prefetch=0)


def test_shard_overwritten_mid_run_stops_at_the_next_epoch(data):
    split = data / "train"
    r = StreamingReader(split, 0, 1, 16)
    r.set_epoch(0)
    assert sum(1 for _ in r) == 30
    (split / "shard-00001.h5").write_bytes((split / "shard-00002.h5").read_bytes())  # same inode, new bytes
    r.set_epoch(1)
    with pytest.raises(ShardIntegrityError, match=r"shard-00001\.h5: changed since the run opened it"):
        next(iter(r))


def test_shard_overwritten_mid_epoch_is_caught_by_the_hash(data):
    split = data / "train"
    r = StreamingReader(split, 0, 1, 16, prefetch=0, shuffle=False)
    it = iter(r)
    next(it)  # the epoch's verifier has recorded the shards' stat; overwrite one it may not have hashed
    src = (split / "shard-00002.h5").read_bytes()
    p = split / "shard-00003.h5"
    st = os.stat(p)
    p.write_bytes(src)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the mtime put back
    with pytest.raises(ShardIntegrityError, match=r"shard-00003\.h5"):  # this epoch if not hashed yet,
        for _ in it:                                                       # else the next one's hash
            pass
        for _ in r:
            pass


def test_the_verifier_thread_stops_when_the_consumer_leaves(data):
    r = StreamingReader(data / "train", 0, 1, 16)
    it = iter(r)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "hpc-verify"]
    assert np.isfinite(next(iter(r))["x"].numpy()).all()


def test_hpc_data_verify_reports_entries_outside_the_split_and_duplicates(data, capsys):
    from hpc.cli import main as cli

    _edit_manifest(data / "train", lambda o: o["shards"].__setitem__(1, dict(o["shards"][0])))
    assert cli(["data", "verify", str(data / "train")]) == 1
    assert "is the same file as shard 0" in capsys.readouterr().out


def test_bench_loader_emits_the_content_check_rows(data, tmp_path, capsys):
    from hpc.cli import main as cli

    out_json = tmp_path / "b.json"
    assert cli(["bench", "loader", "--data", str(data / "train"), "--repeat", "1", "--naive-samples", "32",
                "--rss-gb", "", "--compact-samples", "0", "--integrity-samples", "200", "--rss-dir", str(tmp_path),
                "--json", str(out_json)]) == 0
    assert "content checks" in capsys.readouterr().out
    res = json.loads(out_json.read_text())["integrity"]
    assert set(res) == {"preadv, no check", "preadv + sha256 (a run's first epoch)", "hdf5 io, no check", "hdf5 io + fletcher32"}
    assert all(v["samples"] == 240 for v in res.values())  # whole shards: 2 x 120
    assert not list(tmp_path.glob("hpc-integrity-*"))


# -- the verified-hash cache (issue 20): a restart skips the hash, a changed byte is still caught --

def _run_epoch(split) -> None:
    r = StreamingReader(split, 0, 1, 16, shuffle=False)  # a new reader: what a restarted run builds
    r.set_epoch(0)
    assert sum(1 for _ in r) == 30


@pytest.fixture
def cache(tmp_path, monkeypatch):
    import hpc.data.integrity as integrity

    monkeypatch.setenv("HPC_VERIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(integrity, "RACY_S", 0.0)  # the fixture's shards were written just now
    return tmp_path / "cache"


def test_a_restart_skips_the_hash_of_unchanged_shards(data, cache, monkeypatch):
    made = _verifiers(monkeypatch)
    split = data / "train"
    _run_epoch(split)
    assert made[-1].hashed == [0, 1, 2, 3] and made[-1].from_cache == []
    assert len(list(cache.glob("*/*.json"))) == 4
    _run_epoch(split)  # a restart: nothing in memory, the cache vouches for every shard
    assert made[-1].hashed == [] and made[-1].from_cache == [0, 1, 2, 3]


@pytest.mark.parametrize("how", ["flip", "flip_keep_mtime", "replace_same_size"])
def test_a_changed_shard_is_hashed_again_and_caught_after_a_restart(data, cache, monkeypatch, how):
    made = _verifiers(monkeypatch)
    split = data / "train"
    _run_epoch(split)
    p = split / "shard-00002.h5"
    st = os.stat(p)
    if how == "replace_same_size":  # another shard's bytes under this name (new inode, same size)
        other = split / "shard-00001.h5"
        assert os.path.getsize(other) == st.st_size
        tmp = split / "swap.tmp"
        shutil.copyfile(other, tmp)
        os.replace(tmp, p)
    else:
        off = _x_offset(p) + 7
        with open(p, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x04]))
        if how == "flip_keep_mtime":
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves: nobody can set it
    with pytest.raises(ShardIntegrityError, match=r"shard-00002\.h5: sha256 .* does not match"):
        _run_epoch(split)
    assert 2 not in made[-1].from_cache and 2 in set(made[-1].shards)


def test_a_shard_changed_just_before_its_hash_is_not_cached(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_VERIFY_CACHE", str(tmp_path / "cache"))  # RACY_S as shipped (2 s)
    made = _verifiers(monkeypatch)
    _run_epoch(data / "train")  # the fixture wrote the shards a moment ago
    assert made[-1].hashed == [0, 1, 2, 3] and not list((tmp_path / "cache").glob("*/*.json"))
    _run_epoch(data / "train")
    assert made[-1].from_cache == []


def test_the_cache_can_be_turned_off_and_never_fails_a_run(data, tmp_path, monkeypatch):
    import hpc.data.integrity as integrity

    monkeypatch.setattr(integrity, "RACY_S", 0.0)
    made = _verifiers(monkeypatch)
    monkeypatch.setenv("HPC_VERIFY_CACHE", "off")
    _run_epoch(data / "train")
    _run_epoch(data / "train")
    assert made[-1].hashed == [0, 1, 2, 3]
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # the cache directory cannot be created: a miss, not an error
    monkeypatch.setenv("HPC_VERIFY_CACHE", str(blocked / "cache"))
    _run_epoch(data / "train")
    _run_epoch(data / "train")
    assert made[-1].hashed == [0, 1, 2, 3]
