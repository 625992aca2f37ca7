"""Share a trained `vit_custom` model on the Hugging Face Hub, and get it back.

    from hf_vit_custom.hub import push_model_folder
    push_model_folder("outputs/vit-digits", "user/vit-digits")   # config, weights, code files, processor, card

Anyone can then load it, with this package installed:

    import hf_vit_custom  # registers vit_custom with the Auto classes
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained("user/vit-digits")

or with only transformers, through the two code files that `save_pretrained` wrote next to the weights:

    model = AutoModelForImageClassification.from_pretrained("user/vit-digits", trust_remote_code=True)

The token comes from the `token` argument, else `HF_TOKEN` or `hf auth login`; it is never printed, logged or written,
and a push refuses to upload a file that contains it (a `training_args.bin` pickled with `--hub_token`, say).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx  # the HTTP client huggingface_hub itself raises errors from

from .modeling_vit_custom import AUTO_MAP
from .modeling_vit_custom_mae import MAE_AUTO_MAP
from .persistence import staging_folder

logger = logging.getLogger(__name__)

MODEL_TYPE = "vit_custom"
MAE_ARCHITECTURE = "ViTCustomForMaskedImageModeling"
# Run-time measurements, not results: kept out of the card's evaluation results.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "total_flos")

VIT_CITATION = """@inproceedings{dosovitskiy2021an,
  title={An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale},
  author={Alexey Dosovitskiy and Lucas Beyer and Alexander Kolesnikov and Dirk Weissenborn and Xiaohua Zhai and
          Thomas Unterthiner and Mostafa Dehghani and Matthias Minderer and Georg Heigold and Sylvain Gelly and
          Jakob Uszkoreit and Neil Houlsby},
  booktitle={International Conference on Learning Representations},
  year={2021},
  url={https://arxiv.org/abs/2010.11929}
}"""


class HubError(OSError):
    """A push or pull failed for a reason the user can act on; the message says which (the token is never in it)."""


def check_model_folder(folder: str | os.PathLike) -> dict:
    """The folder's `config.json` as a dict, after checking that it holds a saved `vit_custom` model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass the output directory of a training run or save_pretrained")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: it is not a saved transformers model")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(
            f"{folder} holds a {config.get('model_type')!r} model, not a {MODEL_TYPE!r} one (config.json model_type)"
        )
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} has no model.safetensors: save the model with save_pretrained first")
    return config


def read_metrics(folder: str | os.PathLike) -> dict[str, float]:
    """`all_results.json` (what `training.train` saves), or an empty dict when the folder has none."""
    results = Path(folder) / "all_results.json"
    return json.loads(results.read_text()) if results.is_file() else {}


def eval_results_from_metrics(metrics: dict, dataset: str | None) -> list[EvalResult]:
    """`eval_accuracy` and `test_loss`-style metrics as card evaluation results, one per split and metric."""
    results = []
    for key, value in sorted(metrics.items()):
        split, _, name = key.partition("_")
        if split not in ("eval", "test") or not name or any(name.endswith(skip) for skip in _NOT_METRICS):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset or "custom",
                dataset_name=dataset or "custom",
                dataset_split="validation" if split == "eval" else "test",
                metric_type=name,
                metric_name=name,
                metric_value=value,
            )
        )
    return results


def build_model_card(
    config: dict,
    repo_id: str,
    *,
    metrics: dict | None = None,
    hyperparameters: dict | None = None,
    dataset: str | None = None,
) -> ModelCard:
    """The model card: metadata through `ModelCardData` (no hand-written YAML) and a markdown body."""
    model_name = repo_id.split("/")[-1]
    metrics = metrics or {}
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["vision", "image-classification", MODEL_TYPE, "custom_code"],
        datasets=[dataset] if dataset else None,
        model_name=model_name,
        eval_results=eval_results_from_metrics(metrics, dataset) or None,
    )
    architecture = {
        key: config[key]
        for key in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        if key in config
    }
    labels = config.get("id2label") or {}
    lines = [
        f"# {model_name}",
        "",
        "A Vision Transformer (Dosovitskiy et al., 2020) image classifier, trained with the `hf_vit_custom` package"
        + (f" on `{dataset}`." if dataset else "."),
        "",
        "## How to use",
        "",
        "With the `hf_vit_custom` package installed (importing it registers `vit_custom` with the Auto classes):",
        "",
        "```python",
        "import hf_vit_custom",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification",
        "",
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id}")',
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
        "```",
        "",
        "With only `transformers`, through the code files in this repository (read them before you trust them):",
        "",
        "```python",
        "from transformers import AutoModelForImageClassification",
        "",
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True)',
        "```",
        "",
        "## Model",
        "",
        *(f"- {key}: {value}" for key, value in architecture.items()),
        f"- labels ({len(labels)}): {', '.join(str(label) for label in labels.values())}" if labels else "",
    ]
    if hyperparameters:
        lines += ["", "## Training hyper-parameters", ""]
        lines += [f"- {key}: {value}" for key, value in sorted(hyperparameters.items())]
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in sorted(metrics.items())]
    lines += ["", "## Citation", "", "```bibtex", VIT_CITATION, "```", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n" + "\n".join(lines))


def _stage_folder(folder: Path, staging: Path, config: dict) -> None:
    """Link (or copy) the top-level files into `staging`, completing `auto_map` and the code files there only."""
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith((".", "_")) or path.name == "README.md":
            continue  # checkpoints, runs/ and hidden files stay local; README.md is replaced by the card
        try:
            os.link(path, staging / path.name)
        except OSError:
            shutil.copy2(path, staging / path.name)
    # What the folder's own class needs, as its save would write it: a masked autoencoder's code imports the rest.
    auto_map = MAE_AUTO_MAP if MAE_ARCHITECTURE in (config.get("architectures") or []) else AUTO_MAP
    if any(config.get("auto_map", {}).get(key) != value for key, value in auto_map.items()):
        logger.info("Adding the auto_map for trust_remote_code to the uploaded config.json")
        config = {**config, "auto_map": {**config.get("auto_map", {}), **auto_map}}
        (staging / "config.json").unlink()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    package = Path(__file__).parent
    for name in sorted({f"{value.split('.')[0]}.py" for value in auto_map.values()}):
        if not (staging / name).is_file():
            logger.info("Adding %s for trust_remote_code users", name)
            shutil.copy2(package / name, staging / name)


def _contains(path: Path, needle: bytes, chunk_size: int = 1 << 22) -> bool:
    with open(path, "rb") as file:
        tail = b""
        while chunk := file.read(chunk_size):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn the Hub client's errors into `HubError`s whose messages say what to do."""
    where = f"{repo_id}" + (f" (revision {revision!r})" if revision else "")
    try:
        yield
    except RevisionNotFoundError as error:
        raise HubError(f"Revision {revision!r} not found in {repo_id}: check the branch name or commit id.") from error
    except RepositoryNotFoundError as error:
        raise HubError(
            f"Repository {repo_id} not found, or your token has no access to it: check the repo id, and that you are"
            " logged in (`hf auth login` or HF_TOKEN) with a token allowed to read it (write, to push)."
        ) from error
    except RemoteEntryNotFoundError as error:
        raise HubError(f"{where} lacks a file the model needs: {error}") from error
    except LocalTokenNotFoundError as error:
        raise HubError("No Hugging Face token: run `hf auth login`, set HF_TOKEN or pass token=...") from error
    except OfflineModeIsEnabled as error:
        raise HubError("HF_HUB_OFFLINE=1 is set: unset it to reach the Hub.") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise HubError(
                f"The Hub refused the token for {where} (401): it is invalid or expired. Log in again with"
                " `hf auth login`, or set HF_TOKEN to a valid token."
            ) from error
        if status == 403:
            raise HubError(
                f"The token has no write access to {repo_id} (403): use a token with the write role for its owner."
            ) from error
        raise HubError(f"The Hub answered {status} for {where}: {error}") from error
    except (httpx.ConnectError, httpx.TimeoutException) as error:
        raise HubError(f"Cannot reach the Hub for {where} ({type(error).__name__}): check your connection.") from error


def push_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    metrics: dict | None = None,
    hyperparameters: dict | None = None,
    dataset: str | None = None,
) -> str:
    """Upload a saved `vit_custom` model folder to `repo_id` with a model card; return the commit's URL.

    The repo is created if needed (`private` only applies then), and so is the branch `revision`. `metrics` default
    to the folder's `all_results.json`. The local folder is never changed: the card, and the `auto_map` or code files
    that an older save may lack, are added in a temporary staging folder.

    Raises `ValueError` for a folder that is not a saved `vit_custom` model or that contains the token, and `HubError`
    for authentication, missing repo or revision, and network problems.
    """
    folder = Path(folder)
    config = check_model_folder(folder)
    metrics = read_metrics(folder) if metrics is None else metrics
    api = HfApi(token=token)
    secret = token or get_token()
    with staging_folder(prefix="vit_custom_push_") as staging:
        _stage_folder(folder, staging, config)
        if secret:
            leaking = [path.name for path in sorted(staging.iterdir()) if _contains(path, secret.encode())]
            if leaking:
                raise ValueError(f"Not uploading: {', '.join(leaking)} contain(s) your Hugging Face token.")
        with hub_errors(repo_id, revision):
            # A bare NAME goes to the token owner's namespace: the answer has the full USER/NAME.
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            card = build_model_card(config, repo_id, metrics=metrics, hyperparameters=hyperparameters, dataset=dataset)
            card.save(staging / "README.md")
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                commit_message=commit_message or f"Upload {MODEL_TYPE} model",
            )
    logger.info("Pushed %s to %s", folder, commit.commit_url)
    return commit.commit_url


def push_demo_space(
    model_repo_id: str,
    space_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the Gradio demo of the model `model_repo_id` to the Space `space_id`; return the commit's URL.

    A custom-code model gets no hosted inference widget on the Hub, so the Space is where people try it: its files
    are `hf_vit_custom.demo.write_space_folder`'s, and it loads the model's main branch. The model must already be
    on the Hub (pushed with `push_model_folder`); a bare NAME for either repo means the token owner's namespace. A
    private model also needs an `HF_TOKEN` secret in the Space's settings, which this never uploads.

    Raises `HubError` for a missing model repo, authentication and network problems, `OSError` without gradio.
    """
    from .demo import write_space_folder  # the demo's imports (matplotlib, visualize) only for a Space

    api = HfApi(token=token)
    with hub_errors(model_repo_id):
        if "/" not in model_repo_id:
            model_repo_id = f"{api.whoami()['name']}/{model_repo_id}"
        api.model_info(model_repo_id)  # refuse to build a demo of nothing
    with staging_folder(prefix="vit_custom_space_") as staging:
        write_space_folder(staging, model_repo_id)  # first: a missing gradio creates no empty Space
        with hub_errors(space_id):
            space_id = api.create_repo(
                space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True
            ).repo_id
            commit = api.upload_folder(
                repo_id=space_id,
                repo_type="space",
                folder_path=staging,
                commit_message=commit_message or f"Demo of {model_repo_id}",
            )
    logger.info("Pushed the demo of %s to %s", model_repo_id, commit.commit_url)
    return commit.commit_url


def load_from_hub(repo_id: str, *, revision: str | None = None, token: str | None = None, **kwargs):
    """`AutoModelForImageClassification.from_pretrained(repo_id)` with a clear error for a non-`vit_custom` repo."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoModelForImageClassification

    from . import ViTCustomConfig  # noqa: F401 - importing the package registers vit_custom with the Auto classes

    with hub_errors(repo_id, revision):
        config_file = hf_hub_download(repo_id, "config.json", revision=revision, token=token)
    model_type = json.loads(Path(config_file).read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{repo_id} holds a {model_type!r} model, not a {MODEL_TYPE!r} one")
    with hub_errors(repo_id, revision):
        return AutoModelForImageClassification.from_pretrained(repo_id, revision=revision, token=token, **kwargs)
