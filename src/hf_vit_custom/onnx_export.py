"""ONNX export and onnxruntime inference: a saved model one command away from onnxruntime's CPU kernels.

optimum's exporter would be the ecosystem's tool, but `optimum-onnx` 0.1.0 pins `transformers<4.58` and cannot sit
beside transformers 5, so the export is `torch.onnx.export` (the dynamo exporter) with a dynamic batch dimension. The
folder it writes holds `model.onnx` beside the model's `config.json` and image processor, so that
`OnnxImageClassifier` turns images into labels with onnxruntime alone (processor in, labels out).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, PreTrainedModel

from .configuration_vit_custom import to_pair
from .persistence import write_folder_atomically

ONNX_FILE = "model.onnx"
# The export is checked against PyTorch on this many random images, a batch size other than the traced one.
CHECK_BATCH_SIZE = 3


class LogitsOnly(torch.nn.Module):
    """The classifier with a tensor in and a tensor out, as ONNX graphs take and give them."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def export_onnx(
    model: PreTrainedModel,
    image_processor,
    out_dir: str | os.PathLike,
    opset: int = 18,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> float:
    """Write `model` (a `ViTCustomForImageClassification`) as `out_dir/model.onnx`, with its config and processor.

    The graph takes `pixel_values` (batch, channels, height, width) at the model's size, any batch, and gives
    `logits`. Before `out_dir` is written (atomically, and a non-empty one only with `overwrite`), the graph runs in
    onnxruntime on a batch of another size; a max |logit diff| above `atol` raises `ValueError`. Returns that
    difference.
    """
    import onnxruntime

    if not hasattr(model, "classifier"):
        raise ValueError(f"ONNX export takes an image classifier; {type(model).__name__} has no head.")
    model = model.eval()
    height, width = to_pair(model.config.image_size)
    example = torch.zeros(2, model.config.num_channels, height, width)
    checked = {}

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(
            LogitsOnly(model),
            (example,),
            str(folder / ONNX_FILE),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=opset,
            dynamo=True,
        )
        model.config.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        pixels = torch.randn(CHECK_BATCH_SIZE, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            reference = model(pixel_values=pixels).logits.numpy()
        checked["max_abs_diff"] = float(np.abs(logits - reference).max())
        if checked["max_abs_diff"] > atol:
            raise ValueError(
                f"The ONNX graph's logits differ from PyTorch's by {checked['max_abs_diff']:.2e} (> {atol:g})."
            )

    write_folder_atomically(out_dir, write, overwrite=overwrite)
    return checked["max_abs_diff"]


class OnnxImageClassifier:
    """Images in, top-k labels out, through an exported folder's `model.onnx` and image processor (onnxruntime).

    Example:

    ```python
    >>> classifier = OnnxImageClassifier("vit-digits-onnx")
    >>> classifier([Image.open("seven.png")], top_k=2)
    [[{'label': '7', 'score': 0.98}, {'label': '1', 'score': 0.01}]]
    ```
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        path = Path(folder) / ONNX_FILE
        if not path.is_file():
            raise OSError(f"No {ONNX_FILE} in {str(folder)!r}: export a model with scripts/export_onnx.py first.")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.config = AutoConfig.from_pretrained(folder)

    def logits(self, images: list[Image.Image]) -> np.ndarray:
        """(batch, num_labels) logits for PIL images, prepared by the folder's image processor."""
        mode = "L" if self.config.num_channels == 1 else "RGB"
        pixels = self.processor([image.convert(mode) for image in images], return_tensors="np")["pixel_values"]
        (logits,) = self.session.run(["logits"], {"pixel_values": pixels.astype(np.float32)})
        return logits

    def __call__(self, images: list[Image.Image], top_k: int = 5) -> list[list[dict]]:
        logits = self.logits(images)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        best = np.argsort(-probabilities, axis=1)[:, :top_k]
        return [
            [{"label": self.config.id2label[int(index)], "score": float(row[index])} for index in indices]
            for row, indices in zip(probabilities, best, strict=True)
        ]


__all__ = ["ONNX_FILE", "OnnxImageClassifier", "export_onnx"]
