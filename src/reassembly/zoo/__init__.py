"""The model zoo: registry of built-in architectures and the pretrained weights shipped with the package."""

from .registry import ModelInfo, create_model, is_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "is_model", "list_models", "model_info", "register_model"]
