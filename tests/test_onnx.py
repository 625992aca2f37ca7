"""ONNX export (`scripts/export_onnx.py`, `hf_vit_custom.onnx_export`): parity with PyTorch in onnxruntime, any batch,
and images in, labels out through `OnnxImageClassifier`."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image
from transformers import pipeline

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.data import default_image_processor
from hf_vit_custom.onnx_export import OnnxImageClassifier

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_onnx.py"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("export_onnx", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["export_onnx"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory, script):
    """A tiny classifier with registers and attention pooling, saved, then exported by the script."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("onnx")
    config = ViTCustomConfig(**tiny_config_kwargs(num_register_tokens=2, pooling="map", num_labels=3))
    config.id2label = {0: "cat", 1: "dog", 2: "fox"}
    config.label2id = {label: index for index, label in config.id2label.items()}
    model = ViTCustomForImageClassification(config).eval()
    model.save_pretrained(root / "model")
    default_image_processor(16).save_pretrained(root / "model")
    script.main([str(root / "model"), "--out", str(root / "onnx")])
    return model, root


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_graph_gives_pytorchs_logits_for_any_batch(exported, batch_size):
    import onnxruntime

    model, root = exported
    session = onnxruntime.InferenceSession(str(root / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = torch.randn(batch_size, 3, 16, 16)
    (logits,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        reference = model(pixels).logits.numpy()
    assert logits.shape == (batch_size, 3)
    assert np.abs(logits - reference).max() <= TOLERANCE


def test_images_in_labels_out_as_the_pytorch_pipeline(exported):
    _model, root = exported
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(3)]
    onnx_top = OnnxImageClassifier(root / "onnx", threads=1)(images, top_k=3)
    torch_top = pipeline("image-classification", model=str(root / "model"))(images, top_k=3)
    for ours, reference in zip(onnx_top, torch_top, strict=True):
        assert [row["label"] for row in ours] == [row["label"] for row in reference]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, reference, strict=True)) <= TOLERANCE


def test_an_existing_output_is_kept_unless_overwrite(exported, script):
    _model, root = exported
    before = (root / "onnx" / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        script.main([str(root / "model"), "--out", str(root / "onnx")])
    assert (root / "onnx" / "model.onnx").read_bytes() == before
    with pytest.raises(OSError, match=r"No model\.onnx"):
        OnnxImageClassifier(root / "model")


def test_int8_quantisation_writes_a_second_graph_that_classifies(exported, script):
    """The int8 graph's structure and interface; the accuracy it keeps is checked on the trained main-job model
    (tests/test_training.py), since a random model's input-dependent signal is below int8's resolution."""
    import onnx

    _, root = exported
    script.main([str(root / "model"), "--out", str(root / "int8"), "--int8"])
    fp32_graph, int8_graph = onnx.load(root / "int8" / "model.onnx"), onnx.load(root / "int8" / "model_int8.onnx")
    weights = {initializer.name for initializer in fp32_graph.graph.initializer}
    weight_matmuls = [  # the linear layers; the attention's own products (activations by activations) stay float
        node for node in fp32_graph.graph.node if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights
    ]
    int8_ops = [node.op_type for node in int8_graph.graph.node]
    assert int8_ops.count("MatMulInteger") == len(weight_matmuls) > 0
    int8_weights = [i for i in int8_graph.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= len(weight_matmuls)
    pixels = torch.randn(4, 3, 16, 16)
    int8 = OnnxImageClassifier(root / "int8", threads=1, int8=True)
    (logits,) = int8.session.run(["logits"], {"pixel_values": pixels.numpy()})
    assert logits.shape == (4, 3) and np.isfinite(logits).all()
    images = [Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8))]
    (top,) = int8(images, top_k=3)
    assert sorted(row["label"] for row in top) == ["cat", "dog", "fox"]
    scores = [row["score"] for row in top]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    with pytest.raises(OSError, match=r"No model_int8\.onnx .* with --int8"):
        OnnxImageClassifier(root / "onnx", int8=True)
