"""MAE pre-training: the model, its masking and loss, saving and loading, and the Trainer path end to end."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_bounded, small_run_args, tiny_config_kwargs
from PIL import Image
from transformers import AutoModelForImageClassification, AutoModelForMaskedImageModeling

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification, ViTCustomForMaskedImageModeling
from hf_vit_custom.modeling_vit_custom_mae import ViTCustomMaskedImageModelingOutput, patchify, unpatchify
from hf_vit_custom.pretraining import PretrainingArguments, pretrain
from hf_vit_custom.training import (
    DataArguments,
    ModelArguments,
    decay_parameter_names,
    parse_arguments,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[1]
FP32_TOLERANCE = 1e-5  # different summation orders of the same fp32 maths
# A decoder narrower than the tiny encoder, as in the paper.
TINY_DECODER = {
    "decoder_hidden_size": 16,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 32,
}


def build(attn_implementation="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    config = ViTCustomConfig(**tiny_config_kwargs(**{**TINY_DECODER, **overrides}))
    return ViTCustomForMaskedImageModeling._from_config(config, attn_implementation=attn_implementation).eval()


def images(batch=2, height=16, width=16, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def noise(batch=2, patches=16, seed=2):
    return torch.rand(batch, patches, generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    outputs = build()(images(batch=3), noise=noise(batch=3), output_hidden_states=True, output_attentions=True)
    assert isinstance(outputs, ViTCustomMaskedImageModelingOutput)
    assert outputs.loss.shape == ()
    assert outputs.logits.shape == (3, 16, 4 * 4 * 3)  # every patch's pixels
    assert outputs.mask.shape == outputs.ids_restore.shape == (3, 16)
    # The encoder's states only, on the class token and the 4 visible patches; the decoder reports none.
    assert len(outputs.hidden_states) == 2 + 1
    assert all(state.shape == (3, 4 + 1, 32) for state in outputs.hidden_states)
    assert [weights.shape for weights in outputs.attentions] == [(3, 4, 5, 5)] * 2


@pytest.mark.parametrize(("mask_ratio", "visible"), [(0.75, 4), (0.5, 8), (0.1, 14)])
def test_masking_hides_the_same_number_of_patches_in_every_image(mask_ratio, visible):
    model = build(mask_ratio=mask_ratio)
    tokens = torch.randn(5, 16, 32)
    scores = noise(batch=5)
    kept, mask, ids_restore = model.random_masking(tokens, scores)
    assert kept.shape == (5, visible, 32)
    assert mask.sum(dim=1).tolist() == [16 - visible] * 5
    # The lowest-scored patches stay visible, in order of their score.
    lowest = scores.argsort(dim=1)[:, :visible]
    torch.testing.assert_close(kept, torch.gather(tokens, 1, lowest[..., None].expand(-1, -1, 32)))
    assert torch.all(mask.gather(1, lowest) == 0)
    # `ids_restore` is the permutation that undoes the sort.
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(16).expand(5, -1))
    assert torch.equal(scores.argsort(dim=1).gather(1, ids_restore), torch.arange(16).expand(5, -1))


def test_masks_differ_between_images_and_calls_without_noise():
    model = build()
    first, second = model(images(batch=4)).mask, model(images(batch=4)).mask
    assert not torch.equal(first, second)
    assert len({tuple(row.tolist()) for row in first}) > 1


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_is_the_mean_squared_error_on_masked_patches_only(norm_pix_loss):
    model = build(norm_pix_loss=norm_pix_loss).train()
    pixels = images()
    outputs = model(pixels, noise=noise())
    outputs.logits.retain_grad()
    outputs.loss.backward()
    # Reconstructing a visible patch earns nothing: its predictions get no gradient, every masked one does.
    visible, masked = outputs.mask == 0, outputs.mask == 1
    assert torch.all(outputs.logits.grad[visible] == 0)
    assert torch.all(outputs.logits.grad[masked].abs().sum(dim=-1) > 0)
    target = patchify(pixels, (4, 4))
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((outputs.logits - target) ** 2).mean(-1)[masked].mean()
    torch.testing.assert_close(outputs.loss, expected)


@pytest.mark.parametrize(
    ("height", "width", "patch_size"),
    [(16, 16, (4, 4)), (8, 16, (4, 2)), (12, 20, (3, 5))],  # square, then rectangular patches and images
)
def test_patchify_and_unpatchify_round_trip(height, width, patch_size):
    pixels = images(batch=2, height=height, width=width)
    patches = patchify(pixels, patch_size)
    grid = (height // patch_size[0], width // patch_size[1])
    assert patches.shape == (2, grid[0] * grid[1], patch_size[0] * patch_size[1] * 3)
    # Row-major grid order, each patch laid out (row, column, channel).
    second_patch = pixels[0, :, : patch_size[0], patch_size[1] : 2 * patch_size[1]]
    torch.testing.assert_close(patches[0, 1], second_patch.permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, patch_size, grid), pixels)


def test_rectangular_patches_and_other_resolutions():
    model = build(image_size=[8, 16], patch_size=[4, 2])  # a 2 x 8 grid
    assert model(images(height=8, width=16)).logits.shape == (2, 16, 4 * 2 * 3)
    outputs = model(images(height=16, width=32), interpolate_pos_encoding=True)
    assert outputs.logits.shape == (2, 4 * 16, 4 * 2 * 3)
    assert outputs.mask.sum(dim=1).tolist() == [48, 48]


def test_sdpa_matches_eager():
    eager, sdpa = build(attn_implementation="eager"), build(attn_implementation="sdpa")
    assert sdpa.decoder.config._attn_implementation == "sdpa"
    eager_out, sdpa_out = eager(images(), noise=noise()), sdpa(images(), noise=noise())
    assert (eager_out.logits - sdpa_out.logits).abs().max() <= FP32_TOLERANCE
    assert (eager_out.loss - sdpa_out.loss).abs() <= FP32_TOLERANCE
    eager_out.loss.backward()
    sdpa_out.loss.backward()
    for (name, eager_param), sdpa_param in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(eager_param.grad, sdpa_param.grad, atol=FP32_TOLERANCE, rtol=0, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = build().train(), build().train()
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.decoder.layers[0].gradient_checkpointing
    plain(images(), noise=noise()).loss.backward()
    checkpointed(images(), noise=noise()).loss.backward()
    for (name, param), checkpointed_param in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(param.grad, checkpointed_param.grad, atol=1e-6, rtol=0, msg=name)


def test_every_parameter_receives_a_gradient_and_the_mask_token_is_not_decayed():
    model = build().train()
    model(images()).loss.backward()
    assert [name for name, param in model.named_parameters() if param.grad is None] == []
    assert "decoder.mask_token" not in decay_parameter_names(model)
    assert 0.005 < model.decoder.mask_token.std() < 0.04  # initialised like the MAE release, not left at zero


def test_save_and_reload_through_auto_class_is_exact(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForMaskedImageModeling"] == (
        "modeling_vit_custom_mae.ViTCustomForMaskedImageModeling"
    )
    reloaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert type(reloaded) is ViTCustomForMaskedImageModeling
    assert reloaded.config.decoder_hidden_size == 16
    expected, actual = model(images(), noise=noise()), reloaded(images(), noise=noise())
    assert torch.equal(expected.logits, actual.logits)
    assert torch.equal(expected.loss, actual.loss)


def test_encoder_loads_into_the_classifier_without_renaming(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    classifier, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(classifier) is ViTCustomForImageClassification
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert info["unexpected_keys"] and all(key.startswith("decoder.") for key in info["unexpected_keys"])
    encoder = model.vit.state_dict()
    assert encoder.keys() == classifier.vit.state_dict().keys()
    for name, tensor in classifier.vit.state_dict().items():
        assert torch.equal(tensor, encoder[name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_ratio": 0.0}, r"`mask_ratio` must lie strictly between 0 and 1"),
        ({"mask_ratio": 1.0}, r"`mask_ratio` must lie strictly between 0 and 1"),
        ({"decoder_hidden_size": 0}, "`decoder_hidden_size` must be a positive integer"),
        ({"decoder_num_hidden_layers": 0}, "`decoder_num_hidden_layers` must be a positive integer"),
        ({"decoder_intermediate_size": -1}, "`decoder_intermediate_size` must be a positive integer"),
        ({"decoder_num_attention_heads": 3}, r"`decoder_hidden_size` \(16\) must be divisible by `decoder_num_att"),
        (
            {"decoder_hidden_size": 18, "decoder_num_attention_heads": 2},
            "`decoder_hidden_size` .18. must be divisible by 4",
        ),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTCustomConfig(**tiny_config_kwargs(**{**TINY_DECODER, **overrides}))


def test_a_mask_ratio_that_hides_every_patch_raises_at_the_forward():
    """Not at config time: a classifier's config may have a grid too small to mask, and the input size can change."""
    model = build(mask_ratio=0.95)
    with pytest.raises(ValueError, match=r"`mask_ratio` 0\.95 leaves none of the 16 patches visible"):
        model(images())
    assert model(images(height=32, width=32), interpolate_pos_encoding=True).mask.sum(dim=1).tolist() == [61, 61]


def test_trust_remote_code_loading_without_the_package(tmp_path):
    """A user with only transformers installed loads the pre-trained folder through the copied code files, with every
    Auto class (the MAE file imports the base modeling file, which the save copies too)."""
    model = build()
    model.save_pretrained(tmp_path / "model")
    assert {"configuration_vit_custom.py", "modeling_vit_custom.py", "modeling_vit_custom_mae.py"} <= {
        path.name for path in (tmp_path / "model").iterdir()
    }
    torch.save((images(), noise()), tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_vit_custom"] = None  # importing the package now fails: only the saved files can serve
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForMaskedImageModeling
        folder = {str(tmp_path / "model")!r}
        assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "ViTCustomConfig"
        encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(encoder).__name__ == "ViTCustomModel", type(encoder)
        classifier = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
        assert type(classifier).__name__ == "ViTCustomForImageClassification", type(classifier)
        model = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        pixels, noise = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        torch.save(model.eval()(pixels, noise=noise).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(
        torch.load(tmp_path / "logits.pt", weights_only=True), model(images(), noise=noise()).logits
    )


def parse(args: list[str]):
    return parse_arguments((ModelArguments, DataArguments, PretrainingArguments), args)


def test_pretraining_defaults_fit_the_digits():
    model_args, _, training_args = parse([])
    assert training_args.output_dir == "outputs/vit-digits-mae"
    assert training_args.label_names == ["pixel_values"]  # so that Trainer reports an eval_loss
    digits = resolve_config(model_args, uses_default_data=True)
    assert (digits.hidden_size, digits.decoder_hidden_size, digits.decoder_num_hidden_layers) == (64, 32, 2)
    # The masking is a config field like any other: set through the one config path, the old flag is gone.
    model_args, _, _ = parse(["--config_name", "vit-tiny-patch16-224", "--config_overrides", "mask_ratio=0.6"])
    tiny = resolve_config(model_args, uses_default_data=True)
    assert (tiny.mask_ratio, tiny.hidden_size, tiny.decoder_hidden_size) == (0.6, 192, 512)
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--mask_ratio', '0.6'\]"):
        parse(["--mask_ratio", "0.6"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A few epochs of MAE on a slice of the digits, with the tiny encoder and the digits decoder."""
    output_dir = tmp_path_factory.mktemp("mae")
    args = [*small_run_args(output_dir), "--num_train_epochs", "4", "--logging_steps", "1", "--disable_tqdm", "true"]
    metrics = pretrain(*parse(args))
    return output_dir, metrics


def test_pretraining_lowers_the_reconstruction_loss(pretrained):
    output_dir, metrics = pretrained
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(train_losses) == 4 * 8 and len(eval_losses) == 4
    assert sum(train_losses[-4:]) < 0.9 * sum(train_losses[:4])
    assert eval_losses[-1] < eval_losses[0]
    assert {"eval_loss", "test_loss", "train_runtime"} <= metrics.keys()
    saved = AutoModelForMaskedImageModeling.from_pretrained(output_dir)
    assert saved.config.mask_ratio == 0.75 and saved.config.decoder_hidden_size == 32
    assert (output_dir / "preprocessor_config.json").exists()


def test_train_script_fine_tunes_the_pretrained_encoder(pretrained, tmp_path):
    pretrained_dir, _ = pretrained
    output = run_bounded(
        [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            *small_run_args(tmp_path),
            "--model_name_or_path",
            str(pretrained_dir),
            "--num_train_epochs",
            "1",
            "--num_demo_predictions",
            "0",
            "--disable_tqdm",
            "true",
        ]
    )
    assert "Test accuracy:" in output
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert classifier.config.num_labels == 10 and classifier.config.hidden_size == 32


def test_pretraining_on_a_flat_folder_of_unlabeled_images(tmp_path):
    """No class sub-folders needed: every image below `--train_dir` is read, at any depth."""
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "more").mkdir(parents=True)
    for index in range(20):
        folder = tmp_path / "images" / ("more" if index % 4 == 0 else "")
        Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    args = [
        *small_run_args(tmp_path / "out"),
        "--train_dir",
        str(tmp_path / "images"),
        "--validation_size",
        "0.25",
        "--num_train_epochs",
        "1",
        "--config_overrides",
        "image_size=16,patch_size=4,hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64,"
        "decoder_hidden_size=32,decoder_num_hidden_layers=1,decoder_num_attention_heads=4,decoder_intermediate_size=64",
        "--config_name",
        "vit-tiny-patch16-224",
        "--disable_tqdm",
        "true",
    ]
    metrics = pretrain(*parse(args))
    assert 0 < metrics["eval_loss"] < 10 and metrics["train_runtime"] > 0
    assert "test_loss" not in metrics  # an unlabeled folder has no test split
    assert AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "out").config.num_channels == 3
    # A flat validation folder of its own: no classes to compare with the training folder's.
    (tmp_path / "validation").mkdir()
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(
            tmp_path / "validation" / f"{index}.png"
        )
    with_validation = [*args, "--validation_dir", str(tmp_path / "validation"), "--output_dir", str(tmp_path / "out3")]
    assert 0 < pretrain(*parse(with_validation))["eval_loss"] < 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`train_dir` '.*empty' contains no images"):
        pretrain(*parse([*args, "--train_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out2")]))
