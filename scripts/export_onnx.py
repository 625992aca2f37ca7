"""Export a trained classifier folder to ONNX, checked against PyTorch with onnxruntime.

    python scripts/export_onnx.py outputs/vit-digits --out outputs/vit-digits-onnx [--int8]

The output folder holds `model.onnx` (input `pixel_values`, any batch; output `logits`), `config.json` and the image
processor; `hf_vit_custom.onnx_export.OnnxImageClassifier(OUT)` classifies PIL images with it through onnxruntime.
Nothing is written unless the graph's logits match PyTorch's within `--atol`. `--int8` adds `model_int8.onnx`,
onnxruntime's dynamic int8 quantisation (`OnnxImageClassifier(OUT, int8=True)`).
"""

import argparse
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForImageClassification

import hf_vit_custom  # noqa: F401  (registers the Auto classes)
from hf_vit_custom.cli import raise_usage_errors, run
from hf_vit_custom.onnx_export import export_onnx


def main(argv: list[str] | None = None) -> Path:
    parser = raise_usage_errors(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    parser.add_argument("model", help="a classifier folder saved by the training scripts (or save_pretrained)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty, see --overwrite)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest |logit diff| to PyTorch accepted")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--int8", action="store_true", help="also write model_int8.onnx (dynamic int8 quantisation)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    model = AutoModelForImageClassification.from_pretrained(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    try:
        difference = export_onnx(model, processor, out, args.opset, args.atol, args.overwrite, args.int8)
    except FileExistsError as error:
        raise FileExistsError(f"{error}; pass --overwrite to replace it.") from None
    print(f"Wrote {out / 'model.onnx'} (max |logit diff| to PyTorch {difference:.1e}).")
    return out


if __name__ == "__main__":
    run(main)
