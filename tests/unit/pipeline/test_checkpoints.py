"""Checkpoint bytes and the local store."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from pipeline.checkpoints import (
    DTYPE_KEY,
    CheckpointDType,
    CheckpointError,
    CheckpointStore,
    LocalCheckpointStore,
    checkpoint_uri,
    decode_checkpoint,
    encode_checkpoint,
    parse_checkpoint_uri,
    sha256_hex,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "logits.weight": torch.randn(7, 4, generator=g),
        "logits.bias": torch.randn(7, generator=g),
        "last_bn.num_batches_tracked": torch.tensor(12, dtype=torch.long),
    }


@pytest.mark.parametrize("dtype", list(CheckpointDType))
def test_round_trip(dtype: CheckpointDType) -> None:
    state = _state()
    blob = encode_checkpoint(state, {"model_id": "m1", "version": "v3"}, dtype)
    decoded, meta = decode_checkpoint(blob, expected_sha256=sha256_hex(blob))
    assert meta == {"model_id": "m1", "version": "v3", DTYPE_KEY: dtype.value}
    assert set(decoded) == set(state)
    assert decoded["logits.weight"].dtype == dtype.torch
    assert decoded["last_bn.num_batches_tracked"].dtype == torch.long
    assert int(decoded["last_bn.num_batches_tracked"]) == 12
    tol = 1e-3 if dtype is CheckpointDType.FP16 else 0.0
    torch.testing.assert_close(
        decoded["logits.weight"].float(), state["logits.weight"], atol=tol, rtol=tol
    )


def test_fp16_is_half_the_bytes() -> None:
    state = {"w": torch.zeros(512, 100)}
    fp16 = encode_checkpoint(state, dtype="fp16")
    fp32 = encode_checkpoint(state, dtype="fp32")
    assert len(fp16) < 0.55 * len(fp32)


def test_sha256_mismatch_raises() -> None:
    blob = encode_checkpoint(_state())
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        decode_checkpoint(blob, expected_sha256="0" * 64)
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        decode_checkpoint(bytes(tampered), expected_sha256=sha256_hex(blob))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00" * 7,
        struct.pack("<Q", 1 << 40) + b"{}",
        struct.pack("<Q", 5) + b"nope!",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 4) + b'{"a"',
    ],
)
def test_garbage_raises_checkpoint_error(blob: bytes) -> None:
    with pytest.raises(CheckpointError):
        decode_checkpoint(blob)


def test_corrupted_header_and_truncation_raise() -> None:
    blob = encode_checkpoint(_state())
    with pytest.raises(CheckpointError):
        decode_checkpoint(blob[: len(blob) // 2])
    (length,) = struct.unpack_from("<Q", blob)
    header = blob[8 : 8 + length].replace(b"data_offsets", b"data_offsetz")
    with pytest.raises(CheckpointError):
        decode_checkpoint(blob[:8] + header + blob[8 + length :])
    # offsets pointing past the data
    bad = (
        blob[: 8 + length].replace(b'"data_offsets":[0,', b'"data_offsets":[9,')
        + blob[8 + length :]
    )
    with pytest.raises(CheckpointError):
        decode_checkpoint(bad)


def test_store_put_get_range(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    assert isinstance(store, CheckpointStore)
    blob = encode_checkpoint(_state())
    uri = store.put("model-1", "v000001", blob)
    assert uri == "ckpt://model-1/v000001" == checkpoint_uri("model-1", "v000001")
    assert parse_checkpoint_uri(uri) == ("model-1", "v000001")
    assert (tmp_path / "model-1" / "v000001.safetensors").read_bytes() == blob
    assert store.exists(uri)
    assert store.get(uri) == blob
    assert store.get(store.file_uri(uri)) == blob
    assert store.size(uri) == len(blob)
    assert store.read_range(uri, 3, 20) == blob[3:20]
    assert store.read_range(uri, len(blob) - 4, len(blob) + 100) == blob[-4:]
    # overwrite is atomic and leaves no temporary files behind
    store.put("model-1", "v000001", b"second")
    assert store.get(uri) == b"second"
    assert sorted(p.name for p in (tmp_path / "model-1").iterdir()) == ["v000001.safetensors"]
    assert not store.exists("ckpt://model-1/v2")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.get("ckpt://model-1/v2")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.size("ckpt://model-1/v2")


@pytest.mark.parametrize(
    ("model_id", "version"),
    [
        ("..", "v1"),
        ("m", ".."),
        ("a/b", "v1"),
        ("m", "v/../../x"),
        ("", "v1"),
        ("m", "v 1"),
        ("m", "."),
    ],
)
def test_store_rejects_path_traversal(tmp_path: Path, model_id: str, version: str) -> None:
    store = LocalCheckpointStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match="invalid"):
        store.put(model_id, version, b"x")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "uri",
    [
        "ckpt://../etc/passwd",
        "ckpt://m/../../x",
        "ckpt://m/v/extra",
        "http://m/v",
        "file:///etc/passwd",
        "ckpt://m/v?x=1",
    ],
)
def test_store_rejects_foreign_uris(tmp_path: Path, uri: str) -> None:
    store = LocalCheckpointStore(tmp_path)
    with pytest.raises(CheckpointError):
        store.get(uri)


def test_failed_put_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path)
    with pytest.raises(TypeError):
        store.put("m", "v1", 12345)  # type: ignore[arg-type]
    assert list((tmp_path / "m").iterdir()) == []
