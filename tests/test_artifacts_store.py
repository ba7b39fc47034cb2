"""Step results and files in the object store: codecs (pure) and the store (real nats-server)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nats
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS

from runctl.bus.artifact_codec import (
    ArtifactRef,
    decode_value,
    digest_of,
    encode_value,
    object_name,
)
from runctl.bus.artifact_store import BUCKET, ArtifactStore
from runctl.bus.errors import BadToken, CorruptArtifact

pytestmark = pytest.mark.anyio


# --- codecs -------------------------------------------------------------------------------


def test_small_json_stays_inline_as_its_json_round_trip() -> None:
    encoded = encode_value({"rows": 3, "shape": (2, 3)})
    assert encoded.is_inline and encoded.inline == {"rows": 3, "shape": [2, 3]}


def test_large_json_goes_to_the_store_and_comes_back() -> None:
    value = {"tokens": list(range(100_000))}
    encoded = encode_value(value)
    assert not encoded.is_inline and encoded.codec == "json" and encoded.data is not None
    assert decode_value("json", encoded.data) == value


def test_bytes_numpy_and_torch_use_their_own_formats() -> None:
    raw = encode_value(bytearray(b"\x00\x01"))
    assert (raw.codec, raw.data) == ("bytes", b"\x00\x01")

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    npy = encode_value(array)
    assert npy.codec == "npy" and npy.data is not None
    assert npy.data.startswith(b"\x93NUMPY")  # the .npy format, not a pickle
    back = decode_value("npy", npy.data)
    assert back.dtype == array.dtype and np.array_equal(back, array)

    state = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    encoded = encode_value(state)
    assert encoded.codec == "torch" and encoded.data is not None
    loaded = decode_value("torch", encoded.data)
    assert set(loaded) == {"weight", "bias"} and torch.equal(loaded["weight"], state["weight"])


class Opaque:
    def __init__(self, n: int) -> None:
        self.n = n


def test_pickle_only_when_asked_on_both_sides() -> None:
    with pytest.raises(TypeError, match="pickle=True"):
        encode_value(Opaque(1))
    with pytest.raises(TypeError, match="pickle=True"):
        encode_value(np.array([Opaque(1)], dtype=object))
    encoded = encode_value(Opaque(7), pickle_ok=True)
    assert encoded.codec == "pickle" and encoded.data is not None
    with pytest.raises(TypeError, match="can run code"):
        decode_value("pickle", encoded.data)
    assert decode_value("pickle", encoded.data, pickle_ok=True).n == 7


def test_object_names_are_checked() -> None:
    assert object_name("r1", "0", "epoch", "ab-cd", 1, "result") == "r1/0/epoch/ab-cd/1/result"
    assert object_name("r1", "run", "ckpt", "ab-cd", 1, "files/model.pt").endswith("files/model.pt")
    with pytest.raises(BadToken):
        object_name("r 1", "0", "epoch", "ab-cd", 1, "result")
    for part in ("files/", "files/a/b", "files/..", "other"):
        with pytest.raises(ValueError, match="not a"):
            object_name("r1", "0", "epoch", "ab-cd", 1, part)


# --- the store, on a real server -----------------------------------------------------------


async def _store(url: str) -> tuple[NATS, ArtifactStore]:
    nc = await nats.connect(url)
    return nc, await ArtifactStore.open(nc.jetstream())


async def test_bytes_round_trip_with_the_records_digest(nats_url: str, run_id: str) -> None:
    nc, store = await _store(nats_url)
    try:
        data = os.urandom(3 * 1024 * 1024 + 17)
        name = object_name(run_id, "0", "shard", "k-c", 1, "result")
        ref = await store.put_bytes(name, data, "bytes")
        assert ref.size == len(data) and ref.digest == digest_of(data)
        assert await store.get_bytes(ref) == data
    finally:
        await nc.close()


async def test_a_damaged_or_replaced_object_is_never_returned(nats_url: str, run_id: str) -> None:
    nc, store = await _store(nats_url)
    js = nc.jetstream()
    try:
        name = object_name(run_id, "0", "shard", "k-c", 1, "result")
        data = os.urandom(300_000)
        ref = await store.put_bytes(name, data, "bytes")

        # replaced by another write under the same name: the record's digest no longer fits
        await store.put_bytes(name, os.urandom(300_000), "bytes")
        with pytest.raises(CorruptArtifact, match="replaced"):
            await store.get_bytes(ref)

        # damaged chunks (same size, other bytes): the object store's digest catches it
        ref = await store.put_bytes(name, data, "bytes")
        obj = await js.object_store(BUCKET)
        info = await obj.get_info(name)
        chunks = f"$O.{BUCKET}.C.{info.nuid}"
        await js.purge_stream(f"OBJ_{BUCKET}", subject=chunks)
        damaged = bytearray(data)
        damaged[1000] ^= 0xFF
        for start in range(0, len(damaged), 128 * 1024):
            await js.publish(chunks, bytes(damaged[start : start + 128 * 1024]))
        with pytest.raises(CorruptArtifact, match="digest"):
            await store.get_bytes(ref)

        # gone
        await store.delete(name)
        with pytest.raises(CorruptArtifact, match="missing"):
            await store.get_bytes(ref)
    finally:
        await nc.close()


async def test_files_stream_both_ways_with_progress(
    nats_url: str, run_id: str, tmp_path: Path
) -> None:
    source = tmp_path / "model.pt"
    with source.open("wb") as f:
        for _ in range(20):
            f.write(os.urandom(1024 * 1024))
    nc, store = await _store(nats_url)
    try:
        up: list[int] = []
        name = object_name(run_id, "0", "ckpt", "k-c", 1, "files/model.pt")
        ref = await store.put_file(name, source, progress=lambda done, total: up.append(done))
        assert ref.size == source.stat().st_size and up[-1] == ref.size and len(up) > 10
        down: list[int] = []
        target = tmp_path / "elsewhere" / "model.pt"
        await store.download(ref, target, progress=lambda done, total: down.append(done))
        assert down[-1] == ref.size and not target.with_name("model.pt.partial").exists()
        assert (
            hashlib.sha256(target.read_bytes()).digest()
            == hashlib.sha256(source.read_bytes()).digest()
        )
    finally:
        await nc.close()


async def test_listing_and_deleting_by_prefix(nats_url: str, run_id: str) -> None:
    nc, store = await _store(nats_url)
    try:
        for rid in ("a-1", "b-2"):
            await store.put_bytes(object_name(run_id, "0", "s", rid, 1, "result"), b"x", "bytes")
        await store.put_bytes(object_name(run_id, "1", "s", "a-1", 1, "result"), b"y", "bytes")
        listed = await store.list(f"{run_id}/0/")
        assert [i.name for i in listed] == [
            f"{run_id}/0/s/a-1/1/result",
            f"{run_id}/0/s/b-2/1/result",
        ]
        assert await store.delete_prefix(f"{run_id}/0/") == 2
        assert [i.name for i in await store.list(f"{run_id}/")] == [f"{run_id}/1/s/a-1/1/result"]
        with pytest.raises(ValueError, match="prefix"):
            await store.delete_prefix("")
        missing = ArtifactRef(name=f"{run_id}/9/s/x-y/result", size=1, digest="SHA-256=x")
        with pytest.raises(CorruptArtifact):
            await store.get_bytes(missing)
    finally:
        await nc.close()


async def test_a_download_ends_with_the_objects_last_bytes(
    nats_url: str, run_id: str, tmp_path: Path
) -> None:
    # A size that is no multiple of any chunk or buffer: the last 5 bytes are the ones a
    # buffered writer keeps until it is flushed. The store writes chunks from a worker
    # thread, which may drop the writer's last reference only after the download returned
    # (seen under load: the file ended 5 bytes short), so the download flushes it itself.
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    nc, store = await _store(nats_url)
    try:
        for attempt in range(5):
            name = object_name(run_id, "0", "train", "k-c", attempt, "files/model.bin")
            ref = await store.put_file(name, source)
            target = await store.download(ref, tmp_path / f"host{attempt}" / "model.bin")
            assert target.stat().st_size == ref.size == source.stat().st_size
            assert target.read_bytes() == source.read_bytes()
    finally:
        await nc.close()
