"""DeepLab-v2 segmentation network G: a dilated backbone (output stride 8) and ASPP classifier(s).

Backbones (``model.backbone``):

* ``resnet18`` / ``resnet50`` / ``resnet101`` — torchvision ResNets. For the Bottleneck nets, layer3
  and layer4 are dilated with torchvision's ``replace_stride_with_dilation``; torchvision refuses
  dilation for BasicBlock, so for ``resnet18`` the strides of layer3/layer4 are set to 1 and their
  3×3 convs dilated (2 and 4) by hand, following torchvision's rule for the Bottleneck nets: the
  first block's formerly strided conv keeps the previous dilation, every later 3×3 conv gets the
  layer's dilation (padding = dilation).
* ``vgg16`` — torchvision ``vgg16().features``: pool1–pool3 in ``ceil_mode`` (so every backbone gives
  ``ceil(H/8)``), pool4/pool5 3×3 with stride 1 (padding 1), conv5_x dilated by 2. Single-level
  only. It has no fc6/fc7: the ASPP sits directly on conv5 (512 channels). Its conv blocks map to
  the ResNet names by output stride: ``layer1`` = conv1_x+conv2_x (after pool2, stride 4, 128 ch),
  ``layer2`` = conv3_x (after pool3, stride 8, 256 ch), ``layer3`` = conv4_x (after pool4, 512 ch),
  ``layer4`` = conv5_x (after pool5, 512 ch).

``model.layers`` (3 or 4): how many of the four stages G uses. With 3 the main classifier sits on
layer3 and ``features`` holds layer1..layer3 (the fast CPU setting). ``model.multi_level`` (ResNets
only) adds an auxiliary ASPP on the stage before the main one: layer3 when ``layers: 4`` (the
AdaptSegNet/AdvEnt ResNet-101 model), layer2 when ``layers: 3``.

``forward(x)`` returns :class:`SegOutput` with ``logits`` (``"main"`` and, multi-level, ``"aux"``;
at feature resolution ``ceil(H/8)×ceil(W/8)``; callers upsample) and ``features``
(``layer1``..``layerN``), all from one pass through the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as vgg_make_layers

RESNETS = ("resnet18", "resnet50", "resnet101")
BACKBONES = (*RESNETS, "vgg16")
LAYERS = (3, 4)
ASPP_DILATIONS = (6, 12, 18, 24)
DEFAULTS: dict[str, Any] = {
    "backbone": "resnet18",
    "layers": 4,
    "multi_level": False,
    "freeze_bn": False,
    "init": "random",
    "preprocessing": "imagenet",  # what G's input is (rayuda.data.transforms.normalise); the datasets apply it
    "align_corners": False,  # bilinear logits upsampling convention (rayuda.models.predict.upsample_logits)
}


@dataclass
class SegOutput:
    """What G returns: ``logits`` by level (``"main"``, ``"aux"``) and backbone ``features`` by stage."""

    logits: dict[str, Tensor]
    features: dict[str, Tensor] = field(default_factory=dict)


class ASPP(nn.Module):
    """DeepLab-v2 classifier: four parallel 3×3 convs (dilation = padding = 6, 12, 18, 24), outputs summed.

    All four branches contribute (the public ``Classifier_Module`` returns after the second).
    Weights are drawn from N(0, 0.01) as in DeepLab-v2; biases keep PyTorch's default init.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = ASPP_DILATIONS):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True)
            for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


def _dilate_basic_layer(layer: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a strided BasicBlock stage into a dilated stride-1 one (torchvision refuses to)."""
    for index, block in enumerate(layer):
        for name in ("conv1", "conv2"):
            conv = getattr(block, name)
            d = previous if (index == 0 and name == "conv1") else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        block.stride = 1
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, dilated to output stride 8; returns its stage outputs.

    Parameter names are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean`` …) so that
    ImageNet state dicts load as they are.
    """

    def __init__(self, name: str, layers: int = 4):
        super().__init__()
        if name == "resnet18":
            net = torchvision.models.resnet18(weights=None)
            _dilate_basic_layer(net.layer3, dilation=2, previous=1)
            _dilate_basic_layer(net.layer4, dilation=4, previous=2)
        else:
            ctor = getattr(torchvision.models, name)
            net = ctor(weights=None, replace_stride_with_dilation=[False, True, True])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.stages = [f"layer{i}" for i in range(1, layers + 1)]
        for stage in self.stages:
            setattr(self, stage, getattr(net, stage))
        self.channels = {stage: _out_channels(getattr(self, stage)) for stage in self.stages}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {}
        for stage in self.stages:
            x = getattr(self, stage)(x)
            feats[stage] = x
        return feats


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


# indices into torchvision's vgg16().features
_VGG_POOLS = (4, 9, 16, 23, 30)
_VGG_CONV5 = (24, 26, 28)
_VGG_STAGE_END = {"layer1": 9, "layer2": 16, "layer3": 23, "layer4": 30}
_VGG_CHANNELS = {"layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}


class VGGBackbone(nn.Module):
    """torchvision VGG-16 ``features`` (keys ``features.N.*`` as in torchvision) at output stride 8.

    See the module docstring for the pools, the dilation and the mapping of conv blocks to layer1..4.
    """

    def __init__(self, layers: int = 4):
        super().__init__()
        # vgg16().features without building (and initialising) the 120M-parameter classifier
        mods = list(vgg_make_layers(vgg_cfgs["D"], batch_norm=False).children())
        for module in mods:
            if isinstance(module, nn.Conv2d):  # torchvision VGG's own init
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for i in _VGG_POOLS[:3]:
            mods[i] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        for i in _VGG_POOLS[3:]:
            mods[i] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        for i in _VGG_CONV5:
            mods[i].dilation, mods[i].padding = (2, 2), (2, 2)
        self.stages = [f"layer{i}" for i in range(1, layers + 1)]
        self.features = nn.Sequential(*mods[: _VGG_STAGE_END[self.stages[-1]] + 1])
        self._ends = {_VGG_STAGE_END[s]: s for s in self.stages}
        self.channels = {s: _VGG_CHANNELS[s] for s in self.stages}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self._ends:
                feats[self._ends[index]] = x
        return feats


class DeepLabV2(nn.Module):
    """G: ``backbone`` (stage outputs) + ``classifiers`` (ASPP per output level).

    ``freeze_bn``: the backbone's BatchNorm layers run in eval mode (running statistics fixed) with
    their affine parameters frozen, and stay so after ``model.train()``.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        layers: int = 4,
        multi_level: bool = False,
        freeze_bn: bool = False,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.backbone = VGGBackbone(layers) if backbone == "vgg16" else ResNetBackbone(backbone, layers)
        stages = self.backbone.stages
        self.levels = {"main": stages[-1]}
        if multi_level:
            self.levels["aux"] = stages[-2]
        self.classifiers = nn.ModuleDict(
            {lvl: ASPP(self.backbone.channels[stage], num_classes) for lvl, stage in self.levels.items()}
        )
        self.freeze_bn = False
        self.set_freeze_bn(freeze_bn)
        self.preprocessing, self.align_corners = "imagenet", False  # build_segmenter sets the model.* keys

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of each feature map in ``SegOutput.features`` (what discriminators are built for)."""
        return dict(self.backbone.channels)

    def set_freeze_bn(self, flag: bool) -> None:
        """Freeze (or unfreeze) the backbone's BatchNorm: eval mode and ``requires_grad=False``."""
        self.freeze_bn = bool(flag)
        for bn in self._backbone_bns():
            for param in bn.parameters():
                param.requires_grad_(not self.freeze_bn)
        self.train(self.training)

    def _backbone_bns(self):
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if self.freeze_bn:
            for bn in self._backbone_bns():
                bn.eval()
        return self

    def forward(self, x: Tensor) -> SegOutput:
        feats = self.backbone(x)
        logits = {lvl: self.classifiers[lvl](feats[stage]) for lvl, stage in self.levels.items()}
        return SegOutput(logits=logits, features=feats)


def _check_choice(key: str, value: Any, valid: tuple) -> None:
    if type(value) is not type(valid[0]) or value not in valid:
        raise ValueError(f"model.{key}: invalid value {value!r}; valid values: {', '.join(map(repr, valid))}")


def build_segmenter(cfg: dict[str, Any], num_classes: int) -> DeepLabV2:
    """G from the ``model`` section of a config (keys: ``backbone``, ``layers``, ``multi_level``,
    ``freeze_bn``, ``init``; missing keys take :data:`DEFAULTS`). ``init``: ``"random"``,
    ``"imagenet"`` (torchvision weights, only from the local torch hub cache — never downloaded) or
    the path of a local state-dict file (see :mod:`rayuda.models.weights`).
    """
    from rayuda.models.weights import apply_init

    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"model: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **cfg}
    _check_choice("backbone", cfg["backbone"], BACKBONES)
    _check_choice("layers", cfg["layers"], LAYERS)
    _check_choice("multi_level", cfg["multi_level"], (False, True))
    _check_choice("freeze_bn", cfg["freeze_bn"], (False, True))
    _check_choice("preprocessing", cfg["preprocessing"], ("imagenet", "caffe"))
    _check_choice("align_corners", cfg["align_corners"], (False, True))
    if cfg["multi_level"] and cfg["backbone"] not in RESNETS:
        raise ValueError(
            f"model.multi_level: {cfg['backbone']} is single-level; "
            f"multi_level=true needs one of {', '.join(RESNETS)}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = DeepLabV2(
        num_classes,
        backbone=cfg["backbone"],
        layers=cfg["layers"],
        multi_level=cfg["multi_level"],
        freeze_bn=cfg["freeze_bn"],
    )
    apply_init(model, cfg["init"], preprocessing=cfg["preprocessing"])  # copies into the frozen tensors in place
    model.preprocessing, model.align_corners = cfg["preprocessing"], cfg["align_corners"]
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ("module", "_orig_mod"):  # DataParallel/DDP, torch.compile
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """SGD parameter groups: backbone at ``lr``, classifiers (ASPP) at ``10·lr``; trainable params only.

    A model without ``classifiers`` (e.g. a test stub) gets one group at ``lr``. Empty groups are left out.
    """
    inner = _unwrap(model)
    if hasattr(inner, "classifiers"):
        head = [p for p in inner.classifiers.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        body = [p for p in inner.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": body, "lr": lr}, {"params": head, "lr": 10 * lr}]
    else:
        groups = [{"params": [p for p in inner.parameters() if p.requires_grad], "lr": lr}]
    return [g for g in groups if g["params"]]


__all__ = [
    "ASPP",
    "BACKBONES",
    "DeepLabV2",
    "ResNetBackbone",
    "SegOutput",
    "VGGBackbone",
    "build_segmenter",
    "param_groups",
]
