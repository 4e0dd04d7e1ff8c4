"""Data: sources (digits, CIFAR-10/100, .npz, image folder), the paper's splits, validation."""

from ltta.data.download import download_file, md5sum
from ltta.data.sources import CIFAR, SOURCES, RawDataset, load_source
from ltta.data.splits import loss_predictor_split, stratified_holdout, subsample_stratified
from ltta.data.validation import DataValidationError, validate_splits

__all__ = [
    "CIFAR",
    "SOURCES",
    "DataValidationError",
    "RawDataset",
    "download_file",
    "load_source",
    "loss_predictor_split",
    "md5sum",
    "stratified_holdout",
    "subsample_stratified",
    "validate_splits",
]
