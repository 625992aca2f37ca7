"""Classification metrics shared by the Trainer script and the Accelerate loop.

Why the metrics are defined here rather than loaded:

- `evaluate.load("accuracy")` fetches a script from the Hugging Face Hub (after looking for a folder named
  `accuracy` in the working directory), so it fails offline and can pick up a stray local folder. The metrics are
  therefore `evaluate.Metric` subclasses shipped with the package and instantiated directly: nothing is
  downloaded and no network request is made.
- Every metric is created with `keep_in_memory=True`, so the predictions and references it collects live in an
  in-memory Arrow buffer. By default evaluate writes them to a cache file guarded by a file lock under
  `HF_METRICS_CACHE`, named after `experiment_id`; two processes sharing that id and cache folder at once can
  collide. In memory there is no file and no lock, so concurrent runs (or every rank of an Accelerate job) never
  meet and no `experiment_id` is needed. evaluate still creates an (unused) folder under `cache_dir` when the metric
  is built, so `_InMemoryMetric` points `cache_dir` at a temporary folder that is deleted at once: nothing is left in
  the Hugging Face cache or the working directory.
- `_compute` wraps scikit-learn, as the Hub's own accuracy and F1 scripts do, so the maths is sklearn's.

Both `build_compute_metrics` (for `Trainer`) and `ClassificationMetrics` (for an Accelerate loop) go through
`ClassificationMetrics`, so the two training paths report identical numbers for identical logits.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import datasets
import evaluate
import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

if TYPE_CHECKING:
    from transformers import EvalPrediction

__all__ = [
    "TOP_K",
    "Accuracy",
    "ClassificationMetrics",
    "MacroF1",
    "TopKAccuracy",
    "build_compute_metrics",
]

TOP_K = 5
"""Top-k accuracy is reported for this k, and only when there are more than `TOP_K` classes (it is 1.0 otherwise)."""


class _InMemoryMetric(evaluate.Metric):
    """An `evaluate.Metric` that keeps its data in memory, through evaluate's public `keep_in_memory` and `cache_dir`.

    Keeping data in memory means no cache file or lock, so concurrent processes cannot collide (see module
    docstring). evaluate creates `cache_dir/<name>/<config>` on construction even so, and only its file-backed mode
    reads it: a temporary `cache_dir`, gone once the metric is built, keeps it out of the Hugging Face cache.
    """

    def __init__(self, **kwargs: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="hf_vit_custom_metric_") as cache_dir:
            super().__init__(keep_in_memory=True, cache_dir=cache_dir, **kwargs)


_LABEL_FEATURES = datasets.Features(
    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")},
)

_SKLEARN_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


class Accuracy(_InMemoryMetric):
    """Fraction of examples whose predicted class equals the reference class (sklearn's `accuracy_score`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy: the proportion of predictions that equal their reference class.",
            citation=_SKLEARN_CITATION,
            inputs_description="""
Args:
    predictions (`list` of `int`): Predicted class ids, e.g. the argmax of the logits.
    references (`list` of `int`): Ground-truth class ids.
Returns:
    accuracy (`float`): In [0, 1]; 1.0 when every prediction is correct.
""",
            features=_LABEL_FEATURES,
            format="numpy",
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        return {"accuracy": float(accuracy_score(references, predictions))}


class MacroF1(_InMemoryMetric):
    """Unweighted mean of the per-class F1 scores (sklearn's `f1_score(average="macro")`).

    Unlike accuracy it is not dominated by the frequent classes, which matters on imbalanced data.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=(
                "Macro F1: the F1 score (harmonic mean of precision and recall) of each class, averaged with equal "
                "weight per class."
            ),
            citation=_SKLEARN_CITATION,
            inputs_description="""
Args:
    predictions (`list` of `int`): Predicted class ids, e.g. the argmax of the logits.
    references (`list` of `int`): Ground-truth class ids.
    labels (`list` of `int`, *optional*): Classes to average over. By default, every class that occurs in the
        references or the predictions; a class in neither has no defined F1 and would only add a spurious 0.
Returns:
    f1 (`float`): In [0, 1]; 1.0 when every prediction is correct.
""",
            features=_LABEL_FEATURES,
            format="numpy",
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self, predictions: np.ndarray, references: np.ndarray, labels: list[int] | None = None
    ) -> dict[str, float]:
        return {"f1": float(f1_score(references, predictions, labels=labels, average="macro"))}


class TopKAccuracy(_InMemoryMetric):
    """Fraction of examples whose reference class is among the k highest scores (sklearn's `top_k_accuracy_score`).

    It needs the per-class scores (logits or probabilities), not argmax predictions.
    """

    def _info(self) -> evaluate.MetricInfo:
        info = evaluate.MetricInfo(
            description="Top-k accuracy: the proportion of examples whose reference class is among the k top scores.",
            citation=_SKLEARN_CITATION,
            inputs_description="""
Args:
    predictions (`list` of `list` of `float`): Per-class scores (logits or probabilities), shape (n, n_classes).
    references (`list` of `int`): Ground-truth class ids.
    k (`int`, defaults to 5): How many of the top scores count as a hit.
    labels (`list` of `int`, *optional*): The class id of each score column. Pass it (e.g. `range(n_classes)`)
        whenever the references might not contain every class, which sklearn otherwise rejects.
Returns:
    top{k}_accuracy (`float`): In [0, 1].
""",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")},
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.top_k_accuracy_score.html"
            ],
        )
        # MetricInfo refuses `format` with a non-`Value` feature at construction, but datasets' numpy formatter
        # stacks fixed-length float lists into one (n, n_classes) array. Without it, compute() hands `_compute` a
        # Python list of lists: several times slower and ~8x the memory on ImageNet-sized evaluations.
        info.format = "numpy"
        return info

    def _compute(
        self, predictions: np.ndarray, references: np.ndarray, k: int = TOP_K, labels: list[int] | None = None
    ) -> dict[str, float]:
        return {f"top{k}_accuracy": float(top_k_accuracy_score(references, predictions, k=k, labels=labels))}


def _check_num_labels(num_labels: int) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2 (a classification task), got {num_labels!r}")


def _to_numpy(array: Any) -> np.ndarray:
    """Return `array` as a numpy array; tensors may live on any device and be bfloat16, which numpy lacks."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.is_floating_point():
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _validate(logits: Any, labels: Any, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Check one batch and return it as numpy, so bad input fails loudly here instead of deep inside sklearn."""
    logits, labels = _to_numpy(logits), _to_numpy(labels)
    if logits.ndim != 2:
        raise ValueError(
            f"logits must be 2-D with shape (batch, num_labels), got shape {logits.shape}; pass the raw logits, "
            "not argmax predictions"
        )
    if logits.shape[1] != num_labels:
        raise ValueError(f"logits have {logits.shape[1]} columns but num_labels is {num_labels}")
    if not np.issubdtype(logits.dtype, np.number):
        raise ValueError(f"logits must be numeric, got dtype {logits.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D with shape (batch,), got shape {labels.shape}")
    if len(logits) != len(labels):
        raise ValueError(f"logits and labels have different lengths: {len(logits)} != {len(labels)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_labels):
        bad = labels[(labels < 0) | (labels >= num_labels)]
        raise ValueError(f"labels must be in [0, {num_labels}), got out-of-range values {np.unique(bad)[:10].tolist()}")
    return logits, labels


class ClassificationMetrics:
    """Accumulates logits and labels batch by batch, then reports accuracy, macro F1 and top-5 accuracy.

    Made for an Accelerate evaluation loop: feed it `accelerator.gather_for_metrics((logits, labels))` each step
    and call `compute()` once at the end, because macro F1 cannot be averaged over batches. Each process keeps its
    own in-memory copy, so with gathered inputs every rank computes the same result.

    Args:
        num_labels: Number of classes, i.e. the width of the logits. Top-5 accuracy is only reported when it
            exceeds 5, since with 5 classes or fewer the true class is always in the top 5.
    """

    def __init__(self, num_labels: int) -> None:
        _check_num_labels(num_labels)
        self.num_labels = num_labels
        self._num_examples = 0
        # Both of these consume argmax predictions, so they can share add_batch/compute calls.
        self._label_metrics = evaluate.combine([Accuracy(), MacroF1()])
        self._top_k = TopKAccuracy() if num_labels > TOP_K else None

    def __len__(self) -> int:
        """Number of examples added since the last `compute()`."""
        return self._num_examples

    def add_batch(self, logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add one batch.

        Args:
            logits: Scores of shape (batch, num_labels); torch tensors on any device/dtype, or numpy arrays.
            labels: Integer class ids of shape (batch,), each in [0, num_labels).

        Raises:
            ValueError: If the shapes, lengths, dtypes or label values are wrong; nothing is added then.
        """
        logits, labels = _validate(logits, labels, self.num_labels)
        if len(labels) == 0:  # e.g. a rank's empty last batch; evaluate has nothing to store
            return
        self._label_metrics.add_batch(predictions=logits.argmax(axis=-1), references=labels)
        if self._top_k is not None:
            self._top_k.add_batch(predictions=logits, references=labels)
        self._num_examples += len(labels)

    def compute(self) -> dict[str, float]:
        """Compute the metrics over every batch added so far, then start afresh (as `evaluate` does).

        Returns:
            `{"accuracy": ..., "f1": ...}` plus `"top5_accuracy"` when num_labels > 5, as Python floats.

        Raises:
            ValueError: If no examples were added since the last `compute()`.
        """
        if self._num_examples == 0:
            raise ValueError("no examples to compute metrics on: call add_batch() with a non-empty batch first")
        self._num_examples = 0
        results = self._label_metrics.compute()
        if self._top_k is not None:
            results.update(self._top_k.compute(k=TOP_K, labels=list(range(self.num_labels))))
        return {name: float(value) for name, value in results.items()}


def build_compute_metrics(num_labels: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """Build the `compute_metrics` function for `transformers.Trainer`.

    It runs the evaluation set through a fresh `ClassificationMetrics`, so the Trainer and Accelerate scripts
    report the same numbers.

    Args:
        num_labels: Number of classes, i.e. the width of the model's logits.

    Returns:
        A function mapping an `EvalPrediction` to `{"accuracy", "f1"}` (plus `"top5_accuracy"` when
        num_labels > 5). `predictions` must hold the logits, or be a tuple whose first element is the logits
        (models that also return hidden states or attentions); do not reduce them to argmax with
        `preprocess_logits_for_metrics`, since top-5 accuracy needs the scores.

    Raises:
        ValueError: If num_labels is not an int >= 2; the returned function raises it for malformed predictions.
    """
    _check_num_labels(num_labels)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, tuple):
            if not logits:
                raise ValueError("eval_pred.predictions is an empty tuple; expected the logits as its first element")
            logits = logits[0]
        metrics = ClassificationMetrics(num_labels)  # fresh per call: no state can leak between evaluations
        metrics.add_batch(logits, eval_pred.label_ids)
        return metrics.compute()

    return compute_metrics
