"""Model zoo: CIFAR ResNets, Wide ResNets, VGGs, MobileNetV2 and ShuffleNetV1/V2 (RepDistiller
architectures), and any timm model as ``timm:NAME`` (optional extra, :mod:`ftikd.models.timm_adapter`).

Importing this package registers every architecture; build one with
``build_model(name, in_channels, num_classes)``. Each model's ``forward(x, with_features=False)``
returns a :class:`ModelOutput`; with ``with_features=True`` its ``features`` dict holds the names
listed by ``model.feature_names()`` (``stem``, ``stage{i}``, ``stage{i}_pre``, ``embedding``), and
``model.embedding_dim`` is the width of ``embedding``.
"""

from ftikd.models import mobilenetv2, resnet, shufflenet, vgg, wrn
from ftikd.models.base import ModelOutput, available_models, build_model, register_model

__all__ = [
    "ModelOutput",
    "available_models",
    "build_model",
    "register_model",
    "mobilenetv2",
    "resnet",
    "shufflenet",
    "vgg",
    "wrn",
]
