"""hf_vit_custom: the Vision Transformer as a first-class Hugging Face model.

Importing the package registers it with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoModelForMaskedImageModeling`, `AutoBackbone`, `AutoImageProcessor` and
`pipeline` resolve `model_type="vit_custom"`.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    ViTImageProcessorPil,
)

from .configuration_vit_custom import MODEL_SIZES, ViTCustomConfig
from .modeling_vit_custom import (
    ViTCustomBackbone,
    ViTCustomForImageClassification,
    ViTCustomModel,
    ViTCustomPreTrainedModel,
)
from .modeling_vit_custom_mae import ViTCustomForMaskedImageModeling

__version__ = "0.1.0"

AutoConfig.register(ViTCustomConfig.model_type, ViTCustomConfig, exist_ok=True)
AutoModel.register(ViTCustomConfig, ViTCustomModel, exist_ok=True)
AutoModelForImageClassification.register(ViTCustomConfig, ViTCustomForImageClassification, exist_ok=True)
AutoModelForMaskedImageModeling.register(ViTCustomConfig, ViTCustomForMaskedImageModeling, exist_ok=True)
AutoBackbone.register(ViTCustomConfig, ViTCustomBackbone, exist_ok=True)
# transformers' ViT processor does exactly our resizing and normalising; the PIL backend needs no torchvision.
AutoImageProcessor.register(ViTCustomConfig, image_processor_classes={"pil": ViTImageProcessorPil}, exist_ok=True)

# `save_pretrained` then copies the configuration and modeling files for `trust_remote_code=True` users.
ViTCustomConfig.register_for_auto_class()
ViTCustomModel.register_for_auto_class("AutoModel")
ViTCustomForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ViTCustomForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")

__all__ = [
    "MODEL_SIZES",
    "ViTCustomBackbone",
    "ViTCustomConfig",
    "ViTCustomForImageClassification",
    "ViTCustomForMaskedImageModeling",
    "ViTCustomModel",
    "ViTCustomPreTrainedModel",
]
