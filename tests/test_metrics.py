"""Tests for hf_vit_custom.metrics: expected values are worked out by hand, not recomputed with sklearn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_vit_custom.metrics import ClassificationMetrics, build_compute_metrics


def one_hot_logits(predicted: list[int], num_labels: int) -> np.ndarray:
    """Logits whose argmax is `predicted`."""
    logits = np.zeros((len(predicted), num_labels), dtype=np.float32)
    logits[np.arange(len(predicted)), predicted] = 1.0
    return logits


def f1(tp: int, fp: int, fn: int) -> float:
    """Per-class F1 = 2TP / (2TP + FP + FN)."""
    return 2 * tp / (2 * tp + fp + fn)


def test_three_of_four_correct() -> None:
    # predicted 0,1,2,0 vs true 0,1,2,1: only the last is wrong.
    logits = one_hot_logits([0, 1, 2, 0], num_labels=3)
    labels = np.array([0, 1, 2, 1])
    result = build_compute_metrics(3)(EvalPrediction(predictions=logits, label_ids=labels))
    # class 0: TP 1, FP 1 (the last example); class 1: TP 1, FN 1; class 2: TP 1.
    expected_f1 = (f1(1, 1, 0) + f1(1, 0, 1) + f1(1, 0, 0)) / 3
    assert expected_f1 == pytest.approx(7 / 9)
    assert result == pytest.approx({"accuracy": 0.75, "f1": expected_f1})


def test_macro_f1_averages_only_classes_that_occur() -> None:
    # 4 classes; class 3 is neither a reference nor a prediction, so it must not drag the mean down with a 0.
    logits = one_hot_logits([0, 1, 1, 1, 2], num_labels=4)
    labels = np.array([0, 0, 1, 1, 2])
    result = build_compute_metrics(4)(EvalPrediction(predictions=logits, label_ids=labels))
    # class 0: TP 1, FN 1 -> 2/3; class 1: TP 2, FP 1 -> 4/5; class 2: TP 1 -> 1.
    assert result["f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert result["f1"] == pytest.approx(37 / 45)
    assert result["accuracy"] == pytest.approx(4 / 5)


def test_top5_counts_fifth_but_not_sixth() -> None:
    num_labels = 10
    # Every row ranks class 0 first, class 1 second, ... class j at rank j + 1.
    logits = np.tile(np.arange(num_labels, 0, -1, dtype=np.float32), (3, 1))
    labels = np.array([4, 5, 0])  # 5th (hit), 6th (miss), 1st (hit)
    result = build_compute_metrics(num_labels)(EvalPrediction(predictions=logits, label_ids=labels))
    assert result["top5_accuracy"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(1 / 3)  # argmax is always class 0
    # classes that occur: 0 (TP 1, FP 2), 4 (FN 1), 5 (FN 1).
    assert result["f1"] == pytest.approx((f1(1, 2, 0) + 0 + 0) / 3)


def test_top5_uses_scores_not_argmax_and_handles_missing_classes() -> None:
    # Only class 7 occurs among 8; sklearn rejects that unless told every label. The true class is 2nd or 7th.
    logits = torch.tensor([[0.0, 0, 0, 0, 0, 0, 2, 1], [7.0, 6, 5, 4, 3, 2, 1, 0.5]])
    labels = torch.tensor([7, 7])
    metrics = ClassificationMetrics(8)
    metrics.add_batch(logits, labels)
    result = metrics.compute()
    assert result == pytest.approx({"accuracy": 0.0, "f1": 0.0, "top5_accuracy": 0.5})


@pytest.mark.parametrize(("num_labels", "has_top5"), [(2, False), (5, False), (6, True), (100, True)])
def test_top5_reported_only_above_five_classes(num_labels: int, has_top5: bool) -> None:
    logits = one_hot_logits([0, 1], num_labels)
    labels = np.array([0, 0])
    result = build_compute_metrics(num_labels)(EvalPrediction(predictions=logits, label_ids=labels))
    expected_keys = {"accuracy", "f1", "top5_accuracy"} if has_top5 else {"accuracy", "f1"}
    assert set(result) == expected_keys
    assert result["accuracy"] == pytest.approx(0.5)
    assert all(type(value) is float for value in result.values())


def test_batches_equal_one_call_on_concatenation() -> None:
    num_labels = 7
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, num_labels)).astype(np.float32)
    labels = rng.integers(0, num_labels, size=50)
    whole = build_compute_metrics(num_labels)(EvalPrediction(predictions=logits, label_ids=labels))

    metrics = ClassificationMetrics(num_labels)
    bounds = [0, 13, 13, 30, 31, 50]  # uneven batches, including an empty one and a single example
    for i, (start, stop) in enumerate(pairwise(bounds)):
        batch_logits, batch_labels = logits[start:stop], labels[start:stop]
        if i % 2:  # mix torch and numpy batches, as an Accelerate loop with some numpy post-processing might
            batch_logits, batch_labels = torch.from_numpy(batch_logits), torch.from_numpy(batch_labels)
        metrics.add_batch(batch_logits, batch_labels)
    assert len(metrics) == 50
    assert metrics.compute() == whole
    assert set(whole) == {"accuracy", "f1", "top5_accuracy"}
    assert 0.0 < whole["accuracy"] < whole["top5_accuracy"] < 1.0  # random logits: a non-trivial case


def test_compute_starts_afresh() -> None:
    metrics = ClassificationMetrics(3)
    metrics.add_batch(one_hot_logits([0, 1], 3), np.array([0, 1]))
    assert metrics.compute()["accuracy"] == pytest.approx(1.0)
    assert len(metrics) == 0
    metrics.add_batch(one_hot_logits([2, 2], 3), np.array([0, 2]))
    assert metrics.compute()["accuracy"] == pytest.approx(0.5)  # the first batch is gone


def test_torch_tensors_with_grad_and_bfloat16() -> None:
    logits = torch.tensor(one_hot_logits([0, 1, 2, 0], 3), requires_grad=True).to(torch.bfloat16)
    metrics = ClassificationMetrics(3)
    metrics.add_batch(logits, torch.tensor([0, 1, 2, 1]))
    assert metrics.compute()["accuracy"] == pytest.approx(0.75)


def test_tuple_predictions_use_the_first_element() -> None:
    logits = one_hot_logits([0, 1, 2, 0], 3)
    hidden_states = np.ones((4, 5, 3), dtype=np.float32)  # a wrong shape, so using it would raise
    compute_metrics = build_compute_metrics(3)
    result = compute_metrics(EvalPrediction(predictions=(logits, hidden_states), label_ids=np.array([0, 1, 2, 1])))
    assert result["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.int64), r"logits must be 2-D.*\(4,\)"),
        (np.zeros((4, 3, 1), dtype=np.float32), np.zeros(4, dtype=np.int64), r"logits must be 2-D"),
        (np.zeros((4, 2), dtype=np.float32), np.zeros(4, dtype=np.int64), r"logits have 2 columns but num_labels is 3"),
        (np.zeros((4, 3), dtype=np.float32), np.zeros(3, dtype=np.int64), r"different lengths: 4 != 3"),
        (np.zeros((2, 3), dtype=np.float32), np.array([0, 3]), r"labels must be in \[0, 3\).*\[3\]"),
        (np.zeros((2, 3), dtype=np.float32), np.array([-1, 0]), r"labels must be in \[0, 3\).*\[-1\]"),
        (np.zeros((2, 3), dtype=np.float32), np.array([0.0, 1.0]), r"labels must be integer"),
        (np.zeros((2, 3), dtype=np.float32), np.zeros((2, 1), dtype=np.int64), r"labels must be 1-D"),
    ],
)
def test_bad_batches_raise_and_add_nothing(logits: np.ndarray, labels: np.ndarray, match: str) -> None:
    metrics = ClassificationMetrics(3)
    with pytest.raises(ValueError, match=match):
        metrics.add_batch(logits, labels)
    assert len(metrics) == 0
    with pytest.raises(ValueError, match=match):  # the Trainer path reports the same problem
        build_compute_metrics(3)(EvalPrediction(predictions=logits, label_ids=labels))


def test_compute_without_examples_raises() -> None:
    metrics = ClassificationMetrics(3)
    with pytest.raises(ValueError, match="no examples"):
        metrics.compute()
    metrics.add_batch(np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="no examples"):
        metrics.compute()
    empty = EvalPrediction(predictions=np.zeros((0, 3), dtype=np.float32), label_ids=np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="no examples"):
        build_compute_metrics(3)(empty)


@pytest.mark.parametrize("num_labels", [1, 0, 2.0, True])
def test_bad_num_labels_raise(num_labels: object) -> None:
    with pytest.raises(ValueError, match="num_labels must be an int >= 2"):
        build_compute_metrics(num_labels)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_labels must be an int >= 2"):
        ClassificationMetrics(num_labels)  # type: ignore[arg-type]


def test_empty_tuple_predictions_raise() -> None:
    with pytest.raises(ValueError, match="empty tuple"):
        build_compute_metrics(3)(EvalPrediction(predictions=(), label_ids=np.array([0])))


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket

    attempts = []

    def refuse(name):
        def guard(*args, **kwargs):
            attempts.append(f"{name}{args[:2]!r}")
            raise OSError(f"network access attempted: {name}")
        return guard

    # Installed before anything else is imported, so any attempt to resolve or connect is recorded.
    socket.getaddrinfo = refuse("getaddrinfo")
    socket.create_connection = refuse("create_connection")
    socket.socket.connect = refuse("connect")
    socket.socket.connect_ex = refuse("connect_ex")

    import numpy as np
    from transformers import EvalPrediction
    from hf_vit_custom.metrics import ClassificationMetrics, build_compute_metrics

    logits = np.tile(np.arange(10, 0, -1, dtype=np.float32), (4, 1))  # class j ranks j + 1
    labels = np.array([0, 4, 5, 0])
    trainer = build_compute_metrics(10)(EvalPrediction(predictions=logits, label_ids=labels))
    loop = ClassificationMetrics(10)
    loop.add_batch(logits[:1], labels[:1])
    loop.add_batch(logits[1:], labels[1:])
    print(json.dumps({"trainer": trainer, "loop": loop.compute(), "attempts": attempts}))
    """
)


def test_works_offline_without_network_or_disk(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf_home"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "HF_METRICS_CACHE": str(hf_home / "metrics"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attempts"] == []
    # top-5 hits: ranks 1, 5, 1 (not the 6th); accuracy: 2 of 4; F1: class 0 (TP 2, FP 2), classes 4, 5: 0.
    expected = {"accuracy": 0.5, "f1": f1(2, 2, 0) / 3, "top5_accuracy": 0.75}
    assert out["trainer"] == pytest.approx(expected)
    assert out["loop"] == pytest.approx(expected)
    assert not hf_home.exists() or not any(hf_home.rglob("*")), "metrics wrote into the HF cache"
    assert not any(workdir.iterdir()), "metrics wrote into the working directory"
