"""Training and evaluation through accelerate: resumable classifier training with logged, seeded runs.

Any ``nn.Module`` can be trained and evaluated; nothing here knows the model zoo. A model carries the input
normalisation it expects (``reassembly.data.set_normalization``; ImageNet's when it does not say).
"""

from .evaluate import EvalResult, evaluate
from .loop import train_classifier
from .recipe import TrainRecipe

__all__ = ["EvalResult", "TrainRecipe", "evaluate", "train_classifier"]
