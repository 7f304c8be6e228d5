"""Image data: raw arrays from the Hub, a local folder or the bundled sample, and their geometry."""

from cvae_exp.data.geometry import MNIST, Geometry
from cvae_exp.data.sources import DATASETS, RawData, check_path, load, read_idx

__all__ = ["DATASETS", "MNIST", "Geometry", "RawData", "check_path", "load", "read_idx"]
