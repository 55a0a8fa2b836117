"""Networks: DeepLab-v2 G (ResNet-18/50/101, VGG-16), the methods' discriminators, weight loading."""

from rayuda.models.deeplab import (
    ASPP,
    BACKBONES,
    DeepLabV2,
    SegOutput,
    build_segmenter,
    param_groups,
)
from rayuda.models.discriminators import (
    FineGrainedDiscriminator,
    OutputDiscriminator,
    PixelDiscriminator,
    StyleDiscriminator,
    style_vector,
)
from rayuda.models.predict import predict_logits, upsample_logits
from rayuda.models.weights import (
    apply_init,
    imagenet_checkpoint_paths,
    load_backbone_weights,
    load_imagenet_weights,
    load_weights,
)

__all__ = [
    "ASPP",
    "BACKBONES",
    "DeepLabV2",
    "FineGrainedDiscriminator",
    "OutputDiscriminator",
    "PixelDiscriminator",
    "SegOutput",
    "StyleDiscriminator",
    "apply_init",
    "build_segmenter",
    "imagenet_checkpoint_paths",
    "load_backbone_weights",
    "load_imagenet_weights",
    "load_weights",
    "param_groups",
    "predict_logits",
    "style_vector",
    "upsample_logits",
]
