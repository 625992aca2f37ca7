"""Shared fixtures: tiny configurations that build in milliseconds on a CPU."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import hf_vit_custom  # registers the Auto classes


def tiny_config_kwargs(**overrides):
    """A 2-layer, 32-wide ViT on 16x16 images with 4x4 patches (16 patches + the class token)."""
    kwargs = {
        "image_size": 16,
        "patch_size": 4,
        "num_channels": 3,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "num_labels": 5,
    }
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    return hf_vit_custom.ViTCustomConfig(**tiny_config_kwargs())
