"""The README's LoRA recipe with PEFT: LoRA on the fused `qkv`, the head trained in full, gradient checkpointing
without re-entrance; a few steps, the adapter saved and reloaded, then merged, with the same logits each time."""

import torch
from conftest import tiny_config_kwargs
from peft import LoraConfig, PeftModel, get_peft_model

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification

TOLERANCE = 1e-5


def test_lora_on_qkv_trains_saves_reloads_and_merges_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(num_labels=3))).save_pretrained(
        tmp_path / "base"
    )
    base = ViTCustomForImageClassification.from_pretrained(tmp_path / "base")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    frozen_qkv = base.vit.layers[0].attention.qkv.weight.detach().clone()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], modules_to_save=["classifier"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)

    pixels, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.base_model.model.vit.layers[0].attention.qkv.base_layer.weight, frozen_qkv)

    model.eval()
    with torch.no_grad():
        trained = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        ViTCustomForImageClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    merged = reloaded.merge_and_unload().eval()
    assert isinstance(merged, ViTCustomForImageClassification)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, trained, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(merged(pixel_values=pixels).logits, trained, rtol=0, atol=TOLERANCE)
