"""Data: sources (digits, CIFAR-10/100, .npz, image folder), the paper's splits, validation.

- :mod:`~ltta.data.sources`: ``SOURCES``, ``load_source``, the shared conversions, the digits source
- :mod:`~ltta.data.cifar`, :mod:`~ltta.data.npz_source`, :mod:`~ltta.data.image_folder`: the other sources
"""

from ltta.data.download import download_file, md5sum
from ltta.data.sources import SOURCES, RawDataset, load_source
from ltta.data import cifar, npz_source, image_folder  # noqa: I001 (register their sources after the registry exists, in this order)
from ltta.data.cifar import CIFAR
from ltta.data.splits import check_prepared_splits, check_splittable, loss_predictor_split, stratified_holdout, subsample_stratified
from ltta.data.validation import DataValidationError, validate_splits

__all__ = [
    "CIFAR",
    "SOURCES",
    "DataValidationError",
    "RawDataset",
    "check_prepared_splits",
    "check_splittable",
    "cifar",
    "download_file",
    "image_folder",
    "load_source",
    "loss_predictor_split",
    "md5sum",
    "npz_source",
    "stratified_holdout",
    "subsample_stratified",
    "validate_splits",
]
