"""Model zoo: CIFAR ResNets, Wide ResNets and VGGs (RepDistiller architectures).

Importing this package registers every architecture; build one with
``build_model(name, in_channels, num_classes)``. Each model's ``forward(x, with_features=False)``
returns a :class:`ModelOutput`; with ``with_features=True`` its ``features`` dict holds the names
listed by ``model.feature_names()`` (``stem``, ``stage{i}``, ``stage{i}_pre``, ``embedding``), and
``model.embedding_dim`` is the width of ``embedding``.
"""

from ftikd.models import resnet, vgg, wrn
from ftikd.models.base import ModelOutput, available_models, build_model, register_model

__all__ = ["ModelOutput", "available_models", "build_model", "register_model", "resnet", "vgg", "wrn"]
