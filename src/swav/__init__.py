"""swav: SwAV self-supervised pretraining (Caron et al., NeurIPS 2020)."""

__version__ = "0.1.0"

from swav.sinkhorn import sinkhorn  # noqa: E402
from swav.loss import swapped_prediction_loss, swav_loss  # noqa: E402
from swav.queue import FeatureQueue  # noqa: E402

__all__ = ["sinkhorn", "swapped_prediction_loss", "swav_loss", "FeatureQueue", "__version__"]
