"""The Gradio demo (`hf_vit_custom.demo`, `scripts/demo.py`): its predictions, and the page a person sees in a real
headless Chromium (Debian's `chromium`, driven by Playwright), which skips only when the browser or driver is missing.
"""

import os
import socket
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image
from test_script_errors import clear_mistake_problems, run_script
from transformers import pipeline

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification, ViTCustomModel
from hf_vit_custom.data import default_image_processor
from hf_vit_custom.demo import TOP_K, build_demo, predict, rollout_overlay
from hf_vit_custom.visualize import load_model_and_processor

CHROMIUM = "/usr/bin/chromium"
# Six labels, so that the top five are a choice.
LABELS = ("cat", "dog", "fox", "owl", "yak", "emu")
PAGE_TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random classifier saved with its image processor, as training leaves it."""
    torch.manual_seed(0)
    config = ViTCustomConfig(**tiny_config_kwargs(num_labels=len(LABELS)))
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: index for index, label in config.id2label.items()}
    folder = tmp_path_factory.mktemp("demo") / "model"
    ViTCustomForImageClassification(config).save_pretrained(folder)
    default_image_processor(16).save_pretrained(folder)
    return folder


def random_image(height: int = 40, width: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def expected_top(model_folder, image) -> list[dict]:
    """The top labels as transformers' own pipeline gives them: the model's softmax, best first."""
    return pipeline("image-classification", model=str(model_folder))(image, top_k=TOP_K)


def test_predict_gives_the_softmax_top_5_and_a_rollout_at_the_images_size(model_folder):
    model, image_processor = load_model_and_processor(model_folder)
    image = random_image()
    labels, overlay = predict(model, image_processor, image)
    expected = expected_top(model_folder, image)
    assert list(labels) == [row["label"] for row in expected]
    np.testing.assert_allclose(list(labels.values()), [row["score"] for row in expected], atol=1e-5)
    assert overlay.size == image.size and overlay.mode == "RGB"


def test_the_overlay_is_hot_where_the_rollout_is_high():
    rollout = torch.zeros(16, 16)
    rollout[:4, :4] = 1.0  # all the attention on the top-left corner
    overlay = np.asarray(rollout_overlay(Image.new("RGB", (64, 48), "gray"), rollout)).astype(int)
    red_minus_blue = overlay[..., 0] - overlay[..., 2]
    assert red_minus_blue[:8, :8].mean() > 50 and red_minus_blue[-8:, -8:].mean() < -50


def test_an_encoder_without_a_head_is_refused(tmp_path):
    ViTCustomModel(ViTCustomConfig(**tiny_config_kwargs())).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="ViTCustomModel, not a classifier"):
        build_demo(tmp_path / "encoder")


def test_without_gradio_the_demo_names_the_extra_to_install(model_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets where it is not installed
    with pytest.raises(OSError, match=r"The demo needs gradio, .*pip install 'hf_vit_custom\[demo\]'"):
        build_demo(model_folder)


def test_the_script_says_in_one_line_that_the_model_folder_is_missing():
    result = run_script("demo.py", ["outputs/does-not-exist"])
    problems = clear_mistake_problems("demo.py", result.returncode, result.stderr, r"outputs/does-not-exist")
    assert not problems, "; ".join(problems) + "\n" + result.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served_demo(model_folder, monkeypatch):
    """The demo served in this process on a free loopback port: its URL."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no internet to report to
    demo = build_demo(model_folder)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_a_person_drops_an_image_and_sees_the_top_labels(served_demo, model_folder, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no Playwright: pip install playwright")
    image = random_image()
    image.save(tmp_path / "photo.png")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(served_demo, wait_until="domcontentloaded")
            page.locator("input[type=file]").first.set_input_files(tmp_path / "photo.png")
            bars = page.locator('[data-testid$="-confidence-set"] meter')
            bars.nth(TOP_K - 1).wait_for()
            shown = [(bar.get_attribute("aria-label"), float(bar.get_attribute("value"))) for bar in bars.all()]
            rollout_size = page.wait_for_function(
                "() => { const img = document.querySelector('#rollout img');"
                " return img && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null; }"
            ).json_value()
            page.screenshot(path=tmp_path / "demo.png", full_page=True)
        finally:
            browser.close()
    expected = expected_top(model_folder, image)
    assert [label for label, _ in shown] == [row["label"] for row in expected]
    assert rollout_size == list(image.size)
    np.testing.assert_allclose([score for _, score in shown], [row["score"] for row in expected], atol=1e-5)
    screenshot = (tmp_path / "demo.png").read_bytes()
    assert len(screenshot) > 1000 and screenshot.startswith(b"\x89PNG\r\n\x1a\n")
