"""Digit data: loading raw image arrays from the Hub, a local folder or the bundled sample."""

from cvae_exp.data.sources import DATASETS, RawData, check_path, load, read_idx

__all__ = ["DATASETS", "RawData", "check_path", "load", "read_idx"]
