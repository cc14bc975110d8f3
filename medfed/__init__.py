"""medfed: privacy-preserving federated medical image segmentation."""

from medfed.errors import MedfedError

__version__ = "0.1.0"

__all__ = ["MedfedError", "__version__"]
