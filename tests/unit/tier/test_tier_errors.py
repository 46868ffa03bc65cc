"""Write failures leave the store serving reads, with one log line and counted errors.

Tests may run as root, where a read-only chmod blocks nothing, so the failures here are
real ones root cannot override: a path component that is a regular file, and a file
size limit (RLIMIT_FSIZE, which makes writes fail with EFBIG) in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tier_helpers import make_prompt, tier_warnings

from sgl_kvtier.tier import chunk_path


def test_root_that_cannot_be_created_disables_writes_quietly(open_store, tmp_path, tier_log):
    (tmp_path / "file").write_text("not a directory")
    store = open_store(root=tmp_path / "file" / "tier")
    prompt = make_prompt(2)
    prompt.put(store)
    assert store.flush(10)
    assert store.load(prompt.keys) == [None, None]
    s = store.stats()
    assert (s["write_errors"], s["writes_enabled"], s["chunks_written"]) == (1, False, 0)
    assert s["write_drops"] == 2 and s["misses"] == 2
    assert len(tier_warnings(tier_log)) == 1 and "read-only" in tier_warnings(tier_log)[0]


def _block_shard_of(store, keys):
    """Make the shard directory of a new key a regular file; returns that key's index."""
    for i, key in enumerate(keys):
        shard = chunk_path(store.root, key).parent
        if not shard.exists():
            shard.write_text("in the way")
            return i
    raise AssertionError("every shard already exists")


def test_failed_write_turns_the_store_read_only(open_store, tier_log):
    store = open_store(write_retry_interval=3600)
    old, new = make_prompt(2, seed=1), make_prompt(8, seed=2)
    old.put(store)
    store.flush(10)
    blocked = _block_shard_of(store, new.keys)
    new.put(store, [blocked])
    assert store.flush(10)
    new.put(store)
    s = store.stats()
    assert (s["write_errors"], s["writes_enabled"]) == (1, False)
    assert s["write_drops"] == len(new.keys)  # every later offer, refused at the door
    assert len(tier_warnings(tier_log)) == 1 and "read-only" in tier_warnings(tier_log)[0]
    for got, want in zip(store.load(old.keys), old.payloads):
        assert torch.equal(got, want)


def test_writes_resume_when_the_problem_goes(open_store, tier_log):
    store = open_store(write_retry_interval=0.0)
    prompt = make_prompt(8)
    blocked = _block_shard_of(store, prompt.keys)
    prompt.put(store, [blocked])
    store.flush(10)
    assert not store.stats()["writes_enabled"]
    chunk_path(store.root, prompt.keys[blocked]).parent.unlink()
    prompt.put(store)
    store.flush(10)
    assert store.contains_prefix(prompt.keys) == len(prompt.keys)
    assert store.stats()["writes_enabled"]
    assert any("work again" in m for m in tier_warnings(tier_log))


_FSIZE_SCRIPT = textwrap.dedent("""
    import json, logging, resource, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from tier_helpers import LAYOUT, make_prompt
    from sgl_kvtier.tier import ChunkStore, StoreConfig

    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("sgl_kvtier").addHandler(handler)
    store = ChunkStore(StoreConfig(sys.argv[1], 1 << 30, admission="always",
                                     write_retry_interval=3600))
    resource.setrlimit(resource.RLIMIT_FSIZE, (LAYOUT.nbytes // 2, resource.RLIM_INFINITY))
    prompt = make_prompt(3)
    prompt.put(store)
    store.flush(10)
    store.close()
    print(json.dumps({"stats": store.stats(), "log": lines}))
""")


def test_file_size_limit_error_is_contained(tmp_path):
    # A kernel-enforced write failure (EFBIG), like a full disk, in a process of its own.
    out = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path / "tier"),
                          os.path.dirname(__file__)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    s = result["stats"]
    assert (s["write_errors"], s["chunks_written"], s["writes_enabled"]) == (1, 0, False)
    assert len(result["log"]) == 1 and "File too large" in result["log"][0]
    assert not list((tmp_path / "tier").rglob("*.tmp"))


def _read_only_folder_child(root: str, conn) -> None:
    """In a forked child: drop root (which writes through any mode) to 'nobody', then
    write into a folder of mode 0500. Sends back the stats and the warnings logged."""
    try:
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        conn.send(_write_into_read_only(root))
    except BaseException as e:  # the parent reports it
        conn.send(repr(e))


def _write_into_read_only(root: str):
    import logging
    import pathlib

    from sgl_kvtier.tier import ChunkStore, StoreConfig

    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("sgl_kvtier").addHandler(handler)
    store = ChunkStore(StoreConfig(pathlib.Path(root) / "tier", 1 << 30, admission="always",
                                   write_retry_interval=3600))
    os.chmod(store.root, 0o500)
    make_prompt(1).put(store)
    store.flush(10)
    store.close()
    return store.stats(), lines


def test_read_only_folder():
    import multiprocessing
    import shutil
    import tempfile

    # Outside pytest's 0700 tmp_path, so that the unprivileged child can reach it.
    folder = tempfile.mkdtemp(prefix="kvtier-ro-")
    try:
        if os.geteuid() == 0:
            os.chmod(folder, 0o755)
            os.chown(folder, 65534, 65534)
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_read_only_folder_child, args=(folder, child))
        proc.start()
        assert parent.poll(60), "the child sent nothing"
        answer = parent.recv()
        proc.join(30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert isinstance(answer, tuple), answer
    stats, lines = answer
    assert stats["write_errors"] == 1 and stats["chunks_written"] == 0
    assert len(lines) == 1 and "Permission denied" in lines[0], lines
