"""Training through accelerate: resumable classifier training with logged, seeded runs."""

from .loop import train_classifier
from .recipe import TrainRecipe

__all__ = ["TrainRecipe", "train_classifier"]
