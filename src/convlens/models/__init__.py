"""Offline model zoo, preprocessing and image loading."""

from convlens.models.images import ImageLoadError, load_image
from convlens.models.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from convlens.models.zoo import (
    LoadedModel,
    available_models,
    imagenet_class_names,
    load,
    load_state_dict,
    register_model,
    wrap,
)

__all__ = [
    "IMAGENET_PREPROCESSING",
    "ImageLoadError",
    "LoadedModel",
    "Preprocessing",
    "available_models",
    "imagenet_class_names",
    "load",
    "load_image",
    "load_state_dict",
    "register_model",
    "wrap",
]
