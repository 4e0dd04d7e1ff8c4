"""Architectures by name: ``build_model("wrn_40_2", num_classes=100)``.

Importing this package registers every architecture in :data:`MODELS`. Each model takes float
images [N,3,H,W] in [0,1] and normalises them itself (see :class:`~ltta.models.layers.Normalize`).
"""

from ltta.models import aggregator, feature_head, loss_predictor, resnet, small_cnn, wideresnet
from ltta.models import published  # noqa: I001 (registers 'published' after the architectures it wraps)
from ltta.models.layers import CIFAR_MEAN, CIFAR_STD, Normalize
from ltta.models.registry import MODELS, build_model

__all__ = ["aggregator", "published", "CIFAR_MEAN", "CIFAR_STD", "MODELS", "Normalize", "build_model", "feature_head", "loss_predictor", "resnet", "small_cnn", "wideresnet"]
