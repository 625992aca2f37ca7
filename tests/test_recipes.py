"""Fine-tuning recipes: layer-wise learning-rate decay, Mixup / CutMix, label smoothing and the weight average, as
units and in both training loops (the average resumed exactly from a checkpoint)."""

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_run_args, tiny_config_kwargs
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, HfArgumentParser, ViTImageProcessorPil
from transformers.trainer_pt_utils import LabelSmoother

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.accelerate_loop import AccelerateArguments, train_with_accelerate
from hf_vit_custom.data import ImageClassificationTransform, PerExampleSeededDataset, collate_fn, load_digits_dataset
from hf_vit_custom.pretraining import PretrainingArguments
from hf_vit_custom.recipes import (
    SOFT_LABELS,
    MixupCutmix,
    TrivialAugmentWide,
    WeightAverage,
    layer_id,
    soft_target_cross_entropy,
    training_loss,
    weights_of,
)
from hf_vit_custom.training import (
    DataArguments,
    ModelArguments,
    ViTTrainer,
    ViTTrainingArguments,
    optimizer_parameter_groups,
    prepare_data_and_model,
    train,
)


def tiny_model(**overrides) -> ViTCustomForImageClassification:
    torch.manual_seed(0)
    return ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(**overrides)))


def test_layer_ids_follow_mae():
    assert layer_id("vit.embeddings.cls_token", 2) == 0
    assert layer_id("vit.embeddings.patch_embeddings.projection.weight", 2) == 0
    assert layer_id("vit.layers.0.attention.qkv.weight", 2) == 1
    assert layer_id("vit.layers.1.mlp.fc2.bias", 2) == 2
    assert layer_id("vit.layernorm.weight", 2) == 3
    assert layer_id("classifier.weight", 2) == 3


def test_layer_decay_gives_each_layer_its_rate_and_keeps_the_weight_decay_groups():
    model = tiny_model()
    groups = optimizer_parameter_groups(model, weight_decay=0.05, learning_rate=1e-3, layer_decay=0.5)
    rate_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    parameters = dict(model.named_parameters())
    assert len(rate_of) == len(parameters)  # every parameter in exactly one group
    assert rate_of[id(parameters["classifier.weight"])] == pytest.approx(1e-3)
    assert rate_of[id(parameters["vit.layernorm.weight"])] == pytest.approx(1e-3)
    assert rate_of[id(parameters["vit.layers.1.attention.qkv.weight"])] == pytest.approx(5e-4)
    assert rate_of[id(parameters["vit.layers.0.attention.qkv.weight"])] == pytest.approx(2.5e-4)
    assert rate_of[id(parameters["vit.embeddings.cls_token"])] == pytest.approx(1.25e-4)
    assert decay_of[id(parameters["vit.layers.0.attention.qkv.weight"])] == 0.05
    assert decay_of[id(parameters["vit.layers.0.attention.qkv.bias"])] == 0.0
    assert decay_of[id(parameters["vit.embeddings.cls_token"])] == 0.0
    plain = optimizer_parameter_groups(model, weight_decay=0.05)
    assert [len(group["params"]) for group in plain] == [
        sum(len(g["params"]) for g in groups if g["weight_decay"] == w) for w in (0.05, 0.0)
    ]
    assert all("lr" not in group for group in plain)


def test_trainer_builds_the_layer_decay_optimizer_and_the_schedule_scales_every_group(tmp_path):
    args = ViTTrainingArguments(
        output_dir=str(tmp_path), layer_decay=0.5, learning_rate=1e-3, report_to="none", eval_strategy="no"
    )
    trainer = ViTTrainer(model=tiny_model(), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups})
    assert rates == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])
    assert sorted(set(trainer.lr_scheduler.base_lrs)) == pytest.approx(rates)  # warm-up and cosine scale each alike


def test_mixup_mixes_the_batch_with_itself_reversed_and_the_targets_alike():
    pixels, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixer = MixupCutmix(num_labels=5, mixup_alpha=0.8)
    mixed, targets = mixer(pixels, labels, np.random.default_rng(0))
    share = float(np.random.default_rng(0).beta(0.8, 0.8))
    torch.testing.assert_close(mixed, pixels * share + pixels.flip(0) * (1 - share))
    assert targets[0, 0] == pytest.approx(share) and targets[0, 3] == pytest.approx(1 - share)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area():
    pixels, labels = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 16, 16).clone(), torch.tensor([0, 1])
    mixer = MixupCutmix(num_labels=2, cutmix_alpha=1.0)
    mixed, targets = mixer(pixels, labels, np.random.default_rng(3))
    pasted = (mixed[0] == 1.0).float().mean().item()  # image 0 is zeros, its partner ones
    assert 0 < pasted < 1
    assert targets[0, 1].item() == pytest.approx(pasted)  # the area actually pasted, after clipping
    assert targets[0, 0].item() == pytest.approx(1 - pasted)
    assert set(mixed.unique().tolist()) == {0.0, 1.0}  # pasted, not blended


def test_label_smoothing_is_folded_into_the_mixed_targets():
    mixer = MixupCutmix(num_labels=4, mixup_alpha=1.0, label_smoothing=0.2)
    _, targets = mixer(torch.zeros(1, 3, 4, 4), torch.tensor([2]), np.random.default_rng(0))  # partner: itself
    torch.testing.assert_close(targets, torch.tensor([[0.05, 0.05, 0.85, 0.05]]))


def test_both_switch_between_mixup_and_cutmix():
    mixer = MixupCutmix(num_labels=2, mixup_alpha=0.8, cutmix_alpha=1.0)
    pixels = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 8, 8).clone()
    kinds = set()
    for seed in range(20):
        mixed, _ = mixer(pixels, torch.tensor([0, 1]), np.random.default_rng(seed))
        kinds.add("cutmix" if set(mixed.unique().tolist()) <= {0.0, 1.0} else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_a_mixed_batch_is_the_same_whenever_it_is_fetched(tmp_path):
    """Seeded from (seed, epoch, indices): a resumed run mixes the batch as the uninterrupted one did."""
    from transformers import ViTImageProcessorPil

    from hf_vit_custom.data import ImageClassificationTransform

    split = load_digits_dataset()["train"].select(range(8))
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16})
    transform = ImageClassificationTransform(processor, num_channels=3, train=True, crop_scale=(0.7, 1.0))
    mixer = MixupCutmix(num_labels=10, mixup_alpha=0.8, cutmix_alpha=1.0)
    dataset = PerExampleSeededDataset(split, transform, seed=1, batch_mixer=mixer)
    first, again = collate_fn(dataset.__getitems__([0, 1, 2, 3])), collate_fn(dataset.__getitems__([0, 1, 2, 3]))
    assert first[SOFT_LABELS].shape == (4, 10)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    torch.testing.assert_close(first[SOFT_LABELS].sum(1), torch.ones(4))
    dataset.set_epoch(1)
    assert not torch.equal(collate_fn(dataset.__getitems__([0, 1, 2, 3]))["pixel_values"], first["pixel_values"])
    assert SOFT_LABELS not in collate_fn(PerExampleSeededDataset(split, transform, seed=1).__getitems__([0, 1]))


def test_the_training_loss_is_the_one_each_recipe_needs():
    model = tiny_model().eval()
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits = model(pixel_values=pixels).logits
    plain = training_loss(model, {"pixel_values": pixels, "labels": labels}, 0.0)
    torch.testing.assert_close(plain, F.cross_entropy(logits, labels))
    smoothed = training_loss(model, {"pixel_values": pixels, "labels": labels}, 0.1)
    trainer_smoothed = LabelSmoother(epsilon=0.1)({"logits": logits}, labels)  # what Trainer's flag computes
    torch.testing.assert_close(smoothed, trainer_smoothed)
    assert smoothed > plain
    one_hot = F.one_hot(labels, 5).float()
    soft = training_loss(model, {"pixel_values": pixels, "labels": labels, SOFT_LABELS: one_hot}, 0.0)
    torch.testing.assert_close(soft, plain)
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot), plain)


def test_the_weight_average_follows_the_ema_formula_and_round_trips_a_checkpoint(tmp_path):
    model = tiny_model()
    average = WeightAverage(model, decay=0.9)
    average.update(model)  # the first update copies the weights
    first = model.classifier.weight.detach().clone()
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    average.update(model)
    torch.testing.assert_close(average.module.classifier.weight, 0.9 * first + 0.1 * (first + 1.0))
    average.save(tmp_path)
    restored = WeightAverage(tiny_model(), decay=0.9)
    restored.load(tmp_path)
    assert torch.equal(restored.module.classifier.weight, average.module.classifier.weight)
    assert restored.averaged.n_averaged.item() == 2
    restored.restart_from(model)
    assert torch.equal(restored.module.classifier.weight, model.classifier.weight)
    assert restored.averaged.n_averaged.item() == 0


def test_weights_of_swaps_in_the_average_for_the_block_only():
    model, other = tiny_model(), tiny_model()
    with torch.no_grad():
        other.classifier.weight.add_(1.0)
    own = model.classifier.weight.detach().clone()
    with weights_of(model, other):
        assert torch.equal(model.classifier.weight, other.classifier.weight)
    assert torch.equal(model.classifier.weight, own)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("layer_decay", 1.5, "--layer_decay"),
        ("layer_decay", 0.0, "--layer_decay"),
        ("mixup_alpha", -0.1, "--mixup_alpha"),
        ("cutmix_alpha", float("nan"), "--cutmix_alpha"),
        ("label_smoothing_factor", 1.0, "--label_smoothing_factor"),
        ("ema_decay", 1.0, "--ema_decay"),
    ],
)
def test_bad_recipe_values_are_refused_by_name(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        ViTTrainingArguments(output_dir=str(tmp_path), **{flag: value})


def test_the_weight_average_is_refused_with_fsdp(tmp_path):
    with pytest.raises(ValueError, match=r"--ema_decay.*FSDP"):
        ViTTrainingArguments(output_dir=str(tmp_path), ema_decay=0.99, fsdp="full_shard")


def test_pre_training_refuses_the_fine_tuning_recipes(tmp_path):
    with pytest.raises(ValueError, match=r"--mixup_alpha.*MAE pre-training"):
        PretrainingArguments(output_dir=str(tmp_path), mixup_alpha=0.8)


RECIPE_FLAGS = ["--layer_decay", "0.75", "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0"]
RECIPE_FLAGS += ["--label_smoothing_factor", "0.1", "--ema_decay", "0.9"]
CHECKPOINT_FLAGS = ["--save_strategy", "steps", "--save_steps", "5", "--save_total_limit", "5"]
CHECKPOINT_FLAGS += ["--num_demo_predictions", "0", "--eval_strategy", "no", "--disable_tqdm", "true"]
LOOPS = {
    "trainer": (ViTTrainingArguments, train, "checkpoint-5"),
    "accelerate": (AccelerateArguments, train_with_accelerate, "step_5"),
}


def run_loop(loop: str, output_dir: Path, *extra: str) -> dict:
    arguments_class, entry_point, _ = LOOPS[loop]
    parser = HfArgumentParser((ModelArguments, DataArguments, arguments_class))
    parsed = parser.parse_args_into_dataclasses(
        args=[*small_run_args(output_dir), *RECIPE_FLAGS, *CHECKPOINT_FLAGS, *extra]
    )
    return entry_point(*parsed)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_every_recipe_trains_and_a_resumed_run_ends_with_the_same_average(tmp_path, loop):
    """All recipes at once, 16 steps; resumed mid-epoch (step 5 of 8 per epoch), the weights and their average end
    bit for bit where the uninterrupted run's did, so Mixup, CutMix and the average resume exactly."""
    metrics = run_loop(loop, tmp_path / "full")
    assert {"ema_test_accuracy", "ema_eval_accuracy", "test_accuracy"} <= metrics.keys()
    average = AutoModelForImageClassification.from_pretrained(tmp_path / "full" / "ema")
    trained = load_file(tmp_path / "full" / "model.safetensors")
    assert not torch.equal(average.classifier.weight, trained["classifier.weight"])
    checkpoint = LOOPS[loop][2]
    shutil.copytree(tmp_path / "full" / checkpoint, tmp_path / "resumed" / checkpoint)
    assert (tmp_path / "resumed" / checkpoint / "ema.safetensors").is_file()
    run_loop(loop, tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "resumed" / checkpoint))
    for folder in ("", "ema"):
        full = load_file(tmp_path / "full" / folder / "model.safetensors")
        resumed = load_file(tmp_path / "resumed" / folder / "model.safetensors")
        assert full.keys() == resumed.keys()
        for name in full:
            assert torch.equal(full[name], resumed[name]), (folder, name)


def test_the_output_room_check_counts_the_average_in_every_checkpoint_and_the_final_folder():
    from hf_vit_custom.persistence import training_footprint

    without, with_average = training_footprint(1000, 2), training_footprint(1000, 2, weight_average=True)
    assert with_average - without == 4 * 1000 * (2 + 1 + 1)  # two kept, one being written, and `ema/`


def test_resuming_from_a_checkpoint_without_an_average_starts_one_from_its_weights(tmp_path, caplog):
    model = tiny_model()
    average = WeightAverage(tiny_model(num_labels=5), decay=0.9)
    with torch.no_grad():
        average.module.classifier.weight.add_(1.0)
    with caplog.at_level("WARNING", logger="hf_vit_custom.recipes"):
        average.resume(tmp_path, model)
    assert "holds no weight average" in caplog.text
    assert torch.equal(average.module.classifier.weight, model.classifier.weight)


# ---------------------------------------------------------------------------------------------------------------------
# TrivialAugment
# ---------------------------------------------------------------------------------------------------------------------


def gradient_image(size: int = 32) -> Image.Image:
    """An RGB image whose every pixel differs from its neighbours, so that a shift or shear is visible."""
    pixels = np.arange(size * size * 3, dtype=np.int64).reshape(size, size, 3) % 251
    return Image.fromarray(pixels.astype(np.uint8))


def test_trivial_augment_draws_from_the_wide_space_of_the_paper():
    space = TrivialAugmentWide().space
    assert len(space) == 14 and all(m is None or len(m) == 31 for m, _ in space.values())
    extremes = {name: (m[0], m[-1]) for name, (m, _) in space.items() if m is not None}
    assert extremes["Rotate"] == (0.0, 135.0) and extremes["TranslateX"] == (0.0, 32.0)
    assert extremes["ShearX"] == pytest.approx((0.0, 0.99)) and extremes["Brightness"] == pytest.approx((0.0, 0.99))
    assert extremes["Posterize"] == (8, 2) and extremes["Solarize"] == (255.0, 0.0)
    augment = TrivialAugmentWide()
    generator = torch.Generator().manual_seed(0)
    drawn = [augment.draw(generator) for _ in range(2000)]
    assert {name for name, _ in drawn} == set(space)  # every operation, each about 1/14 of the time
    assert max(Counter(name for name, _ in drawn).values()) < 2000 / 14 * 1.3
    rotations = [magnitude for name, magnitude in drawn if name == "Rotate"]
    assert min(rotations) < -100 and max(rotations) > 100  # both signs


def test_trivial_augment_operations_do_what_their_names_say():
    image = gradient_image()
    pixels = np.asarray(image)
    shifted = np.asarray(TrivialAugmentWide.apply(image, "TranslateX", 5.7))  # whole pixels, as torchvision
    assert np.array_equal(shifted[:, 5:], pixels[:, :-5]) and not shifted[:, :5].any()
    assert np.array_equal(np.asarray(TrivialAugmentWide.apply(image, "TranslateY", -3.0))[:-3], pixels[3:])
    sheared = np.asarray(TrivialAugmentWide.apply(image, "ShearX", 0.5))
    assert np.array_equal(sheared[0], pixels[0])  # about the top-left corner: the first row stays
    assert np.array_equal(sheared[10, :-5], pixels[10, 5:])  # row y samples x + 0.5 y
    quarter = TrivialAugmentWide.apply(image, "Rotate", 90.0)
    assert np.array_equal(np.asarray(quarter), np.asarray(image.transpose(Image.Transpose.ROTATE_90)))
    assert set(np.unique(np.asarray(TrivialAugmentWide.apply(image, "Posterize", 2)))) <= {0, 64, 128, 192}
    solarized = np.asarray(TrivialAugmentWide.apply(image, "Solarize", 128.0)).astype(int)
    assert np.array_equal(solarized, np.where(pixels < 128, pixels, 255 - pixels))
    darker = np.asarray(TrivialAugmentWide.apply(image, "Brightness", -0.5)).astype(int)
    assert np.abs(darker - pixels * 0.5).max() <= 1
    assert TrivialAugmentWide.apply(image, "Identity", 0.0) is image


def test_trivial_augment_is_seeded_per_image_and_keeps_the_crops():
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    plain = ImageClassificationTransform(processor, train=True, crop_scale=(0.5, 1.0))
    augmented = ImageClassificationTransform(processor, train=True, crop_scale=(0.5, 1.0), trivial_augment=True)
    images, seeds = [gradient_image(64)] * 40, list(range(40))
    first, again = augmented.pixel_values(images, seeds), augmented.pixel_values(images, seeds)
    assert torch.equal(first, again)
    assert not torch.equal(first, plain.pixel_values(images, seeds))
    # The operation is drawn after the crop, from the same generator: where it drew Identity, the crop is the plain one.
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for generator in generators:  # the plain transform's draws: the crop box
        plain._crop_box(64, 64, generator)
    drawn = [augmented.trivial_augment.draw(generator)[0] for generator in generators]
    identities = [index for index, name in enumerate(drawn) if name == "Identity"]
    assert identities  # a few of the 40 (1 in 14 each)
    baseline = plain.pixel_values(images, seeds)
    for index in identities:
        assert torch.equal(first[index], baseline[index])


def test_the_trivial_augment_flag_reaches_the_training_transform_only(tmp_path):
    parser = HfArgumentParser((ModelArguments, DataArguments, ViTTrainingArguments))
    args = parser.parse_args_into_dataclasses([*small_run_args(tmp_path), "--trivial_augment", "true"])
    prepared = prepare_data_and_model(*args)
    assert isinstance(prepared.train_transform.trivial_augment, TrivialAugmentWide)
    assert prepared.eval_transform.trivial_augment is None


def test_trivial_augment_matches_torchvision_draw_for_draw():
    # Where torchvision imports (not beside this package's pinned torch): pixel for pixel, with the same seeds.
    torchvision_transforms = pytest.importorskip("torchvision.transforms", reason="torchvision is not installed")
    image = gradient_image(48)
    ours = TrivialAugmentWide()
    for seed in range(200):
        torch.manual_seed(seed)
        expected = torchvision_transforms.TrivialAugmentWide()(image)
        assert np.array_equal(np.asarray(ours(image, torch.Generator().manual_seed(seed))), np.asarray(expected)), seed
