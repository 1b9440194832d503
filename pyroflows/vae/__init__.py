"""VAEs with flow posteriors on binary images: data, models, training, evaluation."""

from .data import BinaryImages, load
from .evaluate import evaluate, save_figures
from .models import POSTERIORS, VAE
from .train import Settings, TrainRun, train

__all__ = [
    "POSTERIORS", "VAE", "BinaryImages", "Settings", "TrainRun", "evaluate", "load",
    "save_figures", "train",
]  # fmt: skip
