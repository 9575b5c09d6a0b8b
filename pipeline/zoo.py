"""The model zoo: builds a backbone and splits it at a freeze level.

A split is the heart of FedEx: the device runs the frozen *prefix* and pushes its output
(the features of :data:`pipeline.records.FEATURE_SHAPES`); the cloud trains only the thawed
*head* on those features and ships the head's state back. ``head(prefix(x))`` is exactly the
full model's forward.

Both halves are views on one model: they hold the model's own modules (no copy) and register
them under the model's own attribute names, so a head's ``state_dict`` keys are the full
model's keys (``logits.weight``, ``repeat_3.0.branch0.conv.weight``, ``features.14.conv…``)
and loading a head checkpoint updates the model in place.

Nothing here downloads anything: facenet-pytorch is always built with ``pretrained=None`` and
weights come only from a local file handed to :func:`load_weights`. torch, torchvision and
facenet-pytorch are imported by this module (it is the torch side of ``pipeline``); callers
that must stay light import it lazily.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from pipeline.errors import FedexError
from pipeline.records import FEATURE_SHAPES, Backbone, Cut

#: Width of the embedding both backbones end in before the classifier (facenet's last_bn).
EMBEDDING_DIM = 512


class ZooError(FedexError):
    """A backbone could not be built, split or loaded; the message says what to fix."""


# --------------------------------------------------------------------------- backbones


class MobileNetV2Embedder(nn.Module):
    """torchvision's MobileNetV2 trunk with facenet's tail: pooled 1280 → 512 embedding →
    classifier, so both backbones split at the same named levels (freeze5 = pooled trunk,
    freeze6 = embedding) and end in the same ``last_linear / last_bn / logits`` modules.
    """

    def __init__(self, num_classes: int, dropout_prob: float = 0.2) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2(weights=None).features
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout_prob)
        self.last_linear = nn.Linear(1280, EMBEDDING_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=0.001, momentum=0.1, affine=True)
        self.logits = nn.Linear(EMBEDDING_DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.flatten(self.avgpool_1a(x))
        x = self.dropout(x)
        x = self.last_bn(self.last_linear(x))
        return self.logits(x)


def build_backbone(
    backbone: Backbone | str,
    *,
    num_classes: int,
    weights: Path | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build ``backbone`` with a ``num_classes``-way classifier, in eval mode, on the CPU.

    Initialisation is deterministic in ``seed`` and leaves the global RNG untouched.
    ``weights`` is a local state-dict file (see :func:`load_weights`); without it the model
    is randomly initialised. Nothing is ever downloaded.
    """
    backbone = Backbone(backbone)
    if num_classes < 1:
        raise ZooError(f"num_classes must be ≥ 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _construct(backbone, num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _construct(backbone: Backbone, num_classes: int) -> nn.Module:
    if backbone is Backbone.INCEPTION_RESNET_V1:
        from facenet_pytorch import InceptionResnetV1

        # pretrained=None: facenet would otherwise download VGGFace2 weights at run time.
        return InceptionResnetV1(pretrained=None, classify=True, num_classes=num_classes)
    return MobileNetV2Embedder(num_classes)


def load_weights(model: nn.Module, path: Path, *, skip_mismatched_logits: bool = True) -> list[str]:
    """Load a local state-dict file (``.safetensors``, or a torch file read with
    ``weights_only=True`` so nothing is unpickled) into ``model``.

    facenet's VGGFace2 file carries an 8,631-way ``logits`` layer: when the model has another
    number of classes, those keys are skipped (the classifier is specific to the pre-training
    identities) and returned. A file without a classifier (an embedding model such as
    :mod:`pipeline.facenet_weights`' conversion) leaves ``logits`` as initialised; its keys
    are returned too. Any other missing, unexpected or misshapen key is a
    :class:`ZooError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"weights file {path} does not exist; pass a local state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ZooError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ZooError(f"{path} does not hold a state dict of tensors")
    own = model.state_dict()
    skipped: list[str] = []
    filtered: dict[str, Tensor] = {}
    for key, value in state.items():
        if (
            skip_mismatched_logits
            and key.startswith("logits.")
            and key in own
            and own[key].shape != value.shape
        ):
            skipped.append(key)
            continue
        filtered[key] = value
    result = _load_state(model, filtered, strict=False, what=f"weights file {path}")
    no_classifier = [k for k in result.missing_keys if k.startswith("logits.")]
    skipped += [k for k in no_classifier if k not in skipped]
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise ZooError(
            f"weights file {path} does not fit a {type(model).__name__}: "
            f"missing {missing[:3]} ({len(missing)}), "
            f"unexpected {result.unexpected_keys[:3]} ({len(result.unexpected_keys)})"
        )
    return sorted(skipped)


# --------------------------------------------------------------------------- the split


class Stage(nn.Module):
    """An ordered run of a model's own modules, registered under the model's own names.

    Modules of an ``nn.Sequential`` parent (MobileNetV2's ``features.k``) are regrouped
    under the parent's name with their original indices, so state-dict keys match the
    full model's.
    """

    def __init__(self, atoms: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        groups: OrderedDict[str, nn.Module | OrderedDict[str, nn.Module]] = OrderedDict()
        for name, module in atoms:
            parent, _, child = name.partition(".")
            if child:
                group = groups.setdefault(parent, OrderedDict())
                assert isinstance(group, OrderedDict)
                group[child] = module
            else:
                groups[name] = module
        for name, item in groups.items():
            self.add_module(name, nn.Sequential(item) if isinstance(item, OrderedDict) else item)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


class FrozenPrefix(Stage):
    """The device's half: always in eval mode, no parameter requires grad."""

    def __init__(self, atoms: list[tuple[str, nn.Module]]) -> None:
        super().__init__(atoms)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenPrefix:
        # The prefix is frozen by definition: BatchNorm statistics and dropout never train.
        return super().train(False)


@dataclass(frozen=True, eq=False)
class Split:
    """A model cut at a freeze level. ``prefix`` and ``head`` share the model's modules.

    Splitting the same model again re-assigns which modules are frozen, so use one split
    of a model at a time.
    """

    backbone: Backbone
    cut: Cut
    model: nn.Module
    prefix: nn.Module
    head: nn.Module

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return FEATURE_SHAPES[self.backbone][self.cut]


_INCEPTION_ATOMS = (
    "conv2d_1a",
    "conv2d_2a",
    "conv2d_2b",
    "maxpool_3a",
    "conv2d_3b",
    "conv2d_4a",
    "conv2d_4b",
    "repeat_1",
    "mixed_6a",
    "repeat_2",
    "mixed_7a",
    "repeat_3",
    "block8",
    "avgpool_1a",
    "flatten",  # facenet's x.view(batch, -1); its dropout commutes with the flatten
    "dropout",
    "last_linear",
    "last_bn",
    "logits",
)
_MOBILENET_ATOMS = (
    *(f"features.{i}" for i in range(19)),
    "avgpool_1a",
    "flatten",
    "dropout",
    "last_linear",
    "last_bn",
    "logits",
)
#: The last module the device runs at each cut (DESIGN.md, "The backbone split").
_LAST_PREFIX_ATOM: dict[Backbone, dict[Cut, str]] = {
    Backbone.INCEPTION_RESNET_V1: {
        Cut.FREEZE1: "maxpool_3a",
        Cut.FREEZE2: "conv2d_4b",
        Cut.FREEZE3: "repeat_1",
        Cut.FREEZE4: "repeat_2",
        Cut.FREEZE5: "flatten",
        Cut.FREEZE6: "last_bn",
    },
    Backbone.MOBILENET_V2: {
        Cut.FREEZE1: "features.1",
        Cut.FREEZE2: "features.3",
        Cut.FREEZE3: "features.6",
        Cut.FREEZE4: "features.13",
        Cut.FREEZE5: "flatten",
        Cut.FREEZE6: "last_bn",
    },
}


def _atoms(model: nn.Module, backbone: Backbone) -> list[tuple[str, nn.Module]]:
    names = _INCEPTION_ATOMS if backbone is Backbone.INCEPTION_RESNET_V1 else _MOBILENET_ATOMS
    atoms: list[tuple[str, nn.Module]] = []
    for name in names:
        if name == "flatten" and not hasattr(model, "flatten"):
            atoms.append((name, nn.Flatten()))
            continue
        try:
            atoms.append((name, model.get_submodule(name)))
        except AttributeError as exc:
            raise ZooError(
                f"model has no module {name!r}: is it a {backbone} from build_backbone()?"
            ) from exc
    return atoms


def split(model: nn.Module, backbone: Backbone | str, cut: Cut | str) -> Split:
    """Cut ``model`` at ``cut``: the prefix (eval, frozen) and the head (trainable).

    At ``full`` the device runs nothing (prefix is the identity) and the head is the model;
    at ``freeze6`` the head is the ``logits`` Linear (512 → num_classes).
    """
    backbone, cut = Backbone(backbone), Cut(cut)
    if cut is Cut.FULL:
        prefix: nn.Module = FrozenPrefix([])
        head = model
    else:
        atoms = _atoms(model, backbone)
        last = _LAST_PREFIX_ATOM[backbone][cut]
        at = next(i for i, (name, _) in enumerate(atoms) if name == last) + 1
        prefix = FrozenPrefix(atoms[:at])
        head = Stage(atoms[at:])
    head.requires_grad_(True)
    return Split(backbone=backbone, cut=cut, model=model, prefix=prefix, head=head)


# --------------------------------------------------------------------------- head state


def head_state_dict(head: nn.Module) -> dict[str, Tensor]:
    """The head's parameters and buffers (BatchNorm statistics included), detached."""
    return {key: value.detach() for key, value in head.state_dict().items()}


def load_head_state(head: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a head checkpoint in place (dtype cast to the head's). Every key must match:
    a checkpoint of another cut, backbone or number of classes is a :class:`ZooError`.
    """
    _load_state(head, state_dict, strict=True, what="head checkpoint")


def _load_state(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool, what: str
) -> _IncompatibleKeys:
    own = module.state_dict()
    wrong = [
        f"{key}: {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and own[key].shape != value.shape
    ]
    if wrong:
        raise ZooError(
            f"{what} does not fit this model (shape mismatch {wrong[:3]}); "
            "was it trained for another backbone, cut or number of classes?"
        )
    if strict:
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ZooError(
                f"{what} does not fit this head: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; was it trained for another cut or backbone?"
            )
    return module.load_state_dict(dict(state_dict), strict=False)


def thawed_parameter_count(head: nn.Module) -> int:
    """Number of parameters the cloud trains (those requiring grad)."""
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- cost model


@functools.lru_cache(maxsize=64)
def head_flops_per_sample(backbone: Backbone | str, cut: Cut | str, num_classes: int) -> int:
    """Training FLOPs per sample of the head at ``cut``: 3 x its forward FLOPs.

    The forward is counted exactly by ``torch.utils.flop_counter.FlopCounterMode`` on the
    meta device (matmuls and convolutions; elementwise ops, BatchNorm, the loss and the
    optimizer step are not counted). Backward is taken as 2 x forward (input gradients and
    weight gradients): the usual convention. It overstates the work of the first thawed
    layer, whose input gradient is never computed (the features need none): for freeze6,
    a single Linear, the true count is 2 x forward, so utilisation computed with this number
    reads 1.5x high there; see :func:`head_train_flops_per_sample` for the exact count.
    """
    return 3 * _count_flops(Backbone(backbone), Cut(cut), num_classes, backward=False)


@functools.lru_cache(maxsize=64)
def head_train_flops_per_sample(backbone: Backbone | str, cut: Cut | str, num_classes: int) -> int:
    """Forward + backward FLOPs per sample of the head, counted op by op (no convention).

    Exact for InceptionResnetV1. For MobileNetV2 it reads high: FlopCounterMode's formula
    for the backward of grouped (depthwise) convolutions ignores the groups.
    """
    return _count_flops(Backbone(backbone), Cut(cut), num_classes, backward=True)


def _count_flops(backbone: Backbone, cut: Cut, num_classes: int, *, backward: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2  # BatchNorm1d in train mode needs more than one sample
    with torch.device("meta"):
        model = _construct(backbone, num_classes)
        head = split(model, backbone, cut).head.train(backward)
        x = torch.zeros(batch, *FEATURE_SHAPES[backbone][cut])
        labels = torch.zeros(batch, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter:
            out = head(x)
            if backward:
                nn.functional.cross_entropy(out, labels).backward()
    return int(counter.get_total_flops()) // batch
