"""ltta: learned test-time augmentation and corruption robustness (Kim et al., NeurIPS 2020)."""

__version__ = "0.1.0"
