"""ONNX export and onnxruntime inference: a saved model one command away from onnxruntime's CPU kernels.

optimum's exporter would be the ecosystem's tool, but `optimum-onnx` 0.1.0 pins `transformers<4.58` and cannot sit
beside transformers 5, so the export is `torch.onnx.export` (the dynamo exporter) with a dynamic batch dimension. The
folder it writes holds `model.onnx` beside the model's `config.json` and image processor, so that
`OnnxImageClassifier` turns images into labels with onnxruntime alone (processor in, labels out). With `int8`, the
folder also holds `model_int8.onnx`: onnxruntime's dynamic quantisation (int8 weights, activations quantised per
batch), smaller and on most CPUs faster, at the accuracy the README measures on the digits model.
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
INT8_FILE = "model_int8.onnx"
# The export is checked against PyTorch on this many random images, a batch size other than the traced one.
CHECK_BATCH_SIZE = 3


class LogitsOnly(torch.nn.Module):
    """The classifier with a tensor in and a tensor out, as ONNX graphs take and give them."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def write_onnx_graph(model: PreTrainedModel, path: str | os.PathLike, opset: int = 18) -> None:
    """`model`'s logits as an ONNX graph at `path`: `pixel_values` (any batch, the model's size) in, `logits` out."""
    if not hasattr(model, "classifier"):
        raise ValueError(f"ONNX export takes an image classifier; {type(model).__name__} has no head.")
    height, width = to_pair(model.config.image_size)
    torch.onnx.export(
        LogitsOnly(model).eval(),
        (torch.zeros(2, model.config.num_channels, height, width),),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        opset_version=opset,
        dynamo=True,
    )


def quantize_int8(onnx_path: str | os.PathLike, int8_path: str | os.PathLike) -> None:
    """onnxruntime's dynamic int8 quantisation of the graph's matmuls (weights per output channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(onnx_path, int8_path, per_channel=True, weight_type=QuantType.QInt8)


def cpu_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime session on the CPU, with `threads` intra-op threads (onnxruntime's default for None)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(
    model: PreTrainedModel,
    image_processor,
    out_dir: str | os.PathLike,
    opset: int = 18,
    atol: float = 1e-4,
    overwrite: bool = False,
    int8: bool = False,
) -> float:
    """Write `model` (a `ViTCustomForImageClassification`) as `out_dir/model.onnx`, with its config and processor.

    The graph takes `pixel_values` (batch, channels, height, width) at the model's size, any batch, and gives
    `logits`. Before `out_dir` is written (atomically, and a non-empty one only with `overwrite`), the graph runs in
    onnxruntime on a batch of another size; a max |logit diff| above `atol` raises `ValueError`. Returns that
    difference. `int8` adds `model_int8.onnx` (`quantize_int8`), whose error is a matter of accuracy, not of `atol`.
    """
    model = model.eval()
    height, width = to_pair(model.config.image_size)
    checked = {}

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_onnx_graph(model, folder / ONNX_FILE, opset)
        model.config.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        shape = (CHECK_BATCH_SIZE, model.config.num_channels, height, width)
        pixels = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        (logits,) = cpu_session(folder / ONNX_FILE).run(["logits"], {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            reference = model(pixel_values=pixels).logits.numpy()
        checked["max_abs_diff"] = float(np.abs(logits - reference).max())
        if checked["max_abs_diff"] > atol:
            raise ValueError(
                f"The ONNX graph's logits differ from PyTorch's by {checked['max_abs_diff']:.2e} (> {atol:g})."
            )
        if int8:
            quantize_int8(folder / ONNX_FILE, folder / INT8_FILE)

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

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, int8: bool = False):
        graph = INT8_FILE if int8 else ONNX_FILE
        path = Path(folder) / graph
        if not path.is_file():
            advice = "with --int8" if int8 else "first"
            raise OSError(f"No {graph} in {str(folder)!r}: export the model with scripts/export_onnx.py {advice}.")
        self.session = cpu_session(path, threads)
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


__all__ = [
    "INT8_FILE",
    "ONNX_FILE",
    "OnnxImageClassifier",
    "cpu_session",
    "export_onnx",
    "quantize_int8",
    "write_onnx_graph",
]
