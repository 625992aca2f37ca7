"""Push to and pull from a local Hub-compatible server (tests/hub_server.py): no internet, no mocks in the clients.

Pushes run in this process with `huggingface_hub.constants` pointed at the server; pulls run in fresh processes with
the environment set before `huggingface_hub` is imported, as a user's would be.
"""

import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_kwargs
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, SpaceCard, constants, snapshot_download
from transformers import ViTImageProcessorPil

import hf_vit_custom
from hf_vit_custom.cli import UsageError, run
from hf_vit_custom.hub import HubError, load_from_hub, push_demo_space, push_model_folder

TOKEN = "hf_FakeTokenForTests0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The server, with this process's client pointed at it (env for subprocesses, constants for this one)."""
    server = HubServer(TOKEN).start()
    home = tmp_path_factory.mktemp("hf_home_push")
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setattr(constants, "ENDPOINT", server.url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # never the developer's own login
        yield server
    server.stop()


def save_model(folder: Path, seed: int) -> torch.Tensor:
    """A tiny classifier saved as training would leave it; returns its logits on `pixels.pt` in the parent folder."""
    torch.manual_seed(seed)
    model = hf_vit_custom.ViTCustomForImageClassification(hf_vit_custom.ViTCustomConfig(**tiny_config_kwargs()))
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75, "eval_loss": 0.5, "epoch": 1.0}))
    pixels_file = folder.parent / "pixels.pt"
    if not pixels_file.exists():
        torch.save(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), pixels_file)
    with torch.no_grad():
        return model.eval()(torch.load(pixels_file, weights_only=True)).logits


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_client(
    script: str, hf_home: Path, server: HubServer, offline: bool = False, package: bool = True, cwd: Path | None = None
) -> None:
    """Run `script` in a fresh interpreter whose Hub client points at `server` (from `cwd`, else `hf_home`'s parent)."""
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(hf_home),
        "HF_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    prelude = "" if package else 'import sys\nsys.modules["hf_vit_custom"] = None\n'
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        cwd=cwd or hf_home.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """One model pushed to `test-user/vit-tiny`: (folder, expected logits, commit url)."""
    work = tmp_path_factory.mktemp("pushed")
    folder = work / "model"
    logits = save_model(folder, seed=0)
    url = push_model_folder(folder, "test-user/vit-tiny", dataset="sklearn-digits", hyperparameters={"lr": 0.001})
    return folder, logits, url


def test_push_then_pull_with_package_snapshot_card_and_offline(hub, pushed, tmp_path):
    folder, logits, url = pushed
    repo = hub.repos["test-user/vit-tiny"]
    assert url.endswith(repo.branches["main"])
    script = f"""
        import json, torch
        import hf_vit_custom
        from huggingface_hub import ModelCard, snapshot_download
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained("test-user/vit-tiny")
        assert type(model).__module__ == "hf_vit_custom.modeling_vit_custom", type(model).__module__
        pixels = torch.load("{folder.parent / "pixels.pt"}", weights_only=True)
        torch.save(model.eval()(pixels).logits, "{tmp_path / "logits.pt"}")
        path = snapshot_download("test-user/vit-tiny")
        card = ModelCard.load("test-user/vit-tiny")
        results = {{(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}}
        files = sorted(__import__("os").listdir(path))
        results = [list(key) + [value] for key, value in results.items()]
        pulled = {{"files": files, "results": results, "data": card.data.to_dict(), "text": card.text}}
        json.dump(pulled, open("{tmp_path / "pull.json"}", "w"))
    """
    run_client(script, tmp_path / "hf_home", hub)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), logits)
    pulled = json.loads((tmp_path / "pull.json").read_text())
    expected_files = sorted(set(snapshot(folder)) | {"README.md"})
    assert pulled["files"] == expected_files
    assert sorted(map(tuple, pulled["results"])) == [("validation", "accuracy", 0.75), ("validation", "loss", 0.5)]
    data = pulled["data"]
    assert data["pipeline_tag"] == "image-classification" and data["library_name"] == "transformers"
    assert data["datasets"] == ["sklearn-digits"] and "vit_custom" in data["tags"]
    assert (
        "trust_remote_code=True" in pulled["text"] and "2010.11929" in pulled["text"] and "lr: 0.001" in pulled["text"]
    )

    # The same HF_HOME, offline: everything comes from the cache.
    (tmp_path / "logits.pt").unlink()
    offline = f"""
        import hf_vit_custom, torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained("test-user/vit-tiny")
        pixels = torch.load("{folder.parent / "pixels.pt"}", weights_only=True)
        torch.save(model.eval()(pixels).logits, "{tmp_path / "logits.pt"}")
    """
    run_client(offline, tmp_path / "hf_home", hub, offline=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), logits)


def test_pull_without_the_package_through_trust_remote_code(hub, pushed, tmp_path):
    folder, logits, _ = pushed
    script = f"""
        import torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained("test-user/vit-tiny", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        pixels = torch.load("{folder.parent / "pixels.pt"}", weights_only=True)
        torch.save(model.eval()(pixels).logits, "{tmp_path / "logits.pt"}")
    """
    run_client(script, tmp_path / "hf_home", hub, package=False)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), logits)


def test_second_push_is_a_new_revision_and_the_old_one_still_loads(hub, tmp_path):
    folder = tmp_path / "model"
    old_logits = save_model(folder, seed=1)
    old_url = push_model_folder(folder, "test-user/vit-revisions")
    new_logits = save_model(folder, seed=2)
    new_url = push_model_folder(folder, "test-user/vit-revisions", commit_message="Retrained")
    old_sha, new_sha = old_url.rsplit("/", 1)[-1], new_url.rsplit("/", 1)[-1]
    assert old_sha != new_sha and hub.repos["test-user/vit-revisions"].branches["main"] == new_sha
    # Only the changed files went into the second commit (the client skips files whose remote oid matches).
    assert push_model_folder(folder, "test-user/vit-revisions") == new_url
    script = f"""
        import hf_vit_custom, torch
        from transformers import AutoModelForImageClassification
        pixels = torch.load("{tmp_path / "pixels.pt"}", weights_only=True)
        for name, revision in (("old", "{old_sha}"), ("new", None)):
            model = AutoModelForImageClassification.from_pretrained("test-user/vit-revisions", revision=revision)
            torch.save(model.eval()(pixels).logits, "{tmp_path}/" + name + ".pt")
    """
    run_client(script, tmp_path / "hf_home", hub)
    torch.testing.assert_close(torch.load(tmp_path / "old.pt", weights_only=True), old_logits)
    torch.testing.assert_close(torch.load(tmp_path / "new.pt", weights_only=True), new_logits)


def test_push_to_a_branch_leaves_main_alone(hub, pushed):
    folder, _, _ = pushed
    repo = hub.repos["test-user/vit-tiny"]
    main_before = repo.branches["main"]
    url = push_model_folder(folder, "test-user/vit-tiny", revision="experiment", metrics={"eval_accuracy": 0.9})
    assert repo.branches["main"] == main_before and url.endswith(repo.branches["experiment"])
    card = ModelCard(repo.commits[repo.branches["experiment"]]["README.md"].decode())
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("accuracy", 0.9)]


def test_clear_errors_and_an_untouched_folder(hub, pushed, tmp_path, monkeypatch):
    folder, _, _ = pushed
    before = snapshot(folder)
    with pytest.raises(HubError, match="refused the token") as error:
        push_model_folder(folder, "test-user/vit-tiny", token="hf_wrongToken0000000000")
    assert "hf_wrongToken" not in str(error.value)
    with pytest.raises(HubError, match="Repository test-user/missing not found"):
        load_from_hub("test-user/missing")
    with pytest.raises(HubError, match="Revision 'nope' not found"):
        load_from_hub("test-user/vit-tiny", revision="nope")
    HfApi().create_repo("test-user/a-bert")
    HfApi().upload_file(
        path_or_fileobj=b'{"model_type": "bert"}', path_in_repo="config.json", repo_id="test-user/a-bert"
    )
    with pytest.raises(ValueError, match="'bert' model, not a 'vit_custom'"):
        load_from_hub("test-user/a-bert")
    with socket.socket() as closed:  # a port nobody listens on: the network is "down"
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(HubError, match="Cannot reach the Hub"):
        push_model_folder(folder, "test-user/vit-tiny")
    assert snapshot(folder) == before

    not_ours = tmp_path / "not_ours"
    not_ours.mkdir()
    (not_ours / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="'vit' model, not a 'vit_custom'"):
        push_model_folder(not_ours, "test-user/x")
    (not_ours / "config.json").write_text(json.dumps({"model_type": "vit_custom"}))
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        push_model_folder(not_ours, "test-user/x")


def test_the_token_is_never_uploaded(hub, pushed, tmp_path, capsys, caplog):
    folder, _, _ = pushed
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    for name, content in snapshot(folder).items():
        (leaky / name).write_bytes(content)
    (leaky / "training_args.bin").write_bytes(b"pickled args with hub_token=" + TOKEN.encode())
    with pytest.raises(ValueError, match=r"training_args\.bin contain") as error:
        push_model_folder(leaky, "test-user/leaky")
    assert TOKEN not in str(error.value) and "test-user/leaky" not in hub.repos
    for repo in hub.repos.values():
        for files in repo.commits.values():
            assert not any(TOKEN.encode() in content for content in files.values())
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_cli_pushes_an_old_save_completed_for_trust_remote_code(hub, tmp_path, capsys):
    folder = tmp_path / "model"
    save_model(folder, seed=3)
    # A save from before the auto_map and code files existed: the upload is completed, the folder is not.
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_vit_custom.py", "modeling_vit_custom.py"):
        (folder / name).unlink(missing_ok=True)
    before = snapshot(folder)
    spec = importlib.util.spec_from_file_location("push_to_hub", ROOT / "scripts" / "push_to_hub.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(folder), "--repo_id", "cli", "--private", "--revision", "dev"]) == 0
    assert capsys.readouterr().out.strip().endswith(hub.repos["test-user/cli"].branches["dev"])
    repo = hub.repos["test-user/cli"]
    files = repo.commits[repo.branches["dev"]]
    assert repo.private and {"modeling_vit_custom.py", "configuration_vit_custom.py", "README.md"} <= set(files)
    assert 'from_pretrained("test-user/cli"' in files["README.md"].decode()  # the namespace was filled in
    assert set(json.loads(files["config.json"])["auto_map"]) == {  # what a classifier's own save writes
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
    }
    assert snapshot(folder) == before
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: script.main([str(tmp_path / "nowhere"), "--repo_id", "test-user/cli"]))
    assert exit_info.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_training_with_push_to_hub_uploads_the_model_and_card(hub, tmp_path, capsys, caplog):
    """`scripts/train.py --push_to_hub` (Trainer's own pushes, then the final card commit) through the local Hub.

    The token comes from `HF_TOKEN` and appears in nothing the run writes, uploads or logs.
    """
    from transformers import HfArgumentParser

    from hf_vit_custom.training import DataArguments, ModelArguments, ViTTrainingArguments, train

    parser = HfArgumentParser((ModelArguments, DataArguments, ViTTrainingArguments))
    output_dir = tmp_path / "vit-trained"
    args = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(output_dir),
            "--config_overrides",
            "hidden_size=32,num_hidden_layers=1",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "32",
            "--num_train_epochs",
            "1",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--num_demo_predictions",
            "0",
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "test-user/vit-trained",
        ]
    )
    metrics = train(*args)
    files = HfApi().list_repo_files("test-user/vit-trained")
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "modeling_vit_custom.py",
        "configuration_vit_custom.py",
        "README.md",
    } <= set(files)
    card = ModelCard.load("test-user/vit-trained")
    test_results = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == "test"}
    assert test_results["accuracy"] == pytest.approx(metrics["test_accuracy"])
    repo = hub.repos["test-user/vit-trained"]
    assert all(TOKEN.encode() not in content for commit in repo.commits.values() for content in commit.values())
    written = snapshot(output_dir)
    assert "training_args.bin" in written and "config.json" in written and "README.md" in written
    assert [name for name, content in written.items() if TOKEN.encode() in content] == []
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_a_token_on_the_command_line_is_refused():
    from hf_vit_custom.training import ViTTrainingArguments

    with pytest.raises(ValueError, match="HF_TOKEN") as error:
        ViTTrainingArguments(output_dir="unused", hub_token=TOKEN)
    assert TOKEN not in str(error.value)


def test_an_old_masked_autoencoder_save_is_completed_with_its_own_code_file(hub, tmp_path):
    folder = tmp_path / "mae"
    config = hf_vit_custom.ViTCustomConfig(
        **tiny_config_kwargs(decoder_hidden_size=16, decoder_num_attention_heads=2, decoder_num_hidden_layers=1)
    )
    hf_vit_custom.ViTCustomForMaskedImageModeling(config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    del saved["auto_map"]
    (folder / "config.json").write_text(json.dumps(saved))
    for path in folder.glob("*.py"):
        path.unlink()
    before = snapshot(folder)
    push_model_folder(folder, "test-user/mae")
    repo = hub.repos["test-user/mae"]
    files = repo.commits[repo.branches["main"]]
    assert {"configuration_vit_custom.py", "modeling_vit_custom.py", "modeling_vit_custom_mae.py"} <= set(files)
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert auto_map["AutoModelForMaskedImageModeling"] == "modeling_vit_custom_mae.ViTCustomForMaskedImageModeling"
    assert snapshot(folder) == before


def push_to_hub_script():
    spec = importlib.util.spec_from_file_location("push_to_hub", ROOT / "scripts" / "push_to_hub.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_demo_space_arrives_and_its_app_builds_from_the_model_repo(hub, pushed, tmp_path):
    url = push_demo_space("test-user/vit-tiny", "vit-tiny-demo")
    space = hub.spaces["test-user/vit-tiny-demo"]  # a bare NAME went to the token owner's namespace
    assert space.sdk == "gradio" and url == f"{hub.url}/spaces/test-user/vit-tiny-demo/commit/{space.branches['main']}"
    assert "test-user/vit-tiny-demo" not in hub.repos  # a Space, not a model repo
    files = space.commits[space.branches["main"]]
    assert {"app.py", "requirements.txt", "README.md", "hf_vit_custom/demo.py", "hf_vit_custom/visualize.py"} <= set(
        files
    )
    assert "build_demo('test-user/vit-tiny')" in files["app.py"].decode()
    requirements = files["requirements.txt"].decode().split()
    assert any(line.startswith("torch") for line in requirements) and not any("gradio" in line for line in requirements)

    # Read back through the client, as the Hub serves a Space's files.
    card = SpaceCard.load("test-user/vit-tiny-demo", repo_type="space")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["test-user/vit-tiny"]
    assert card.data.sdk_version == importlib.metadata.version("gradio")
    space_folder = Path(snapshot_download("test-user/vit-tiny-demo", repo_type="space", local_dir=tmp_path / "space"))
    # What the Space runs: app.py, importing the package copied beside it, loading the model from the Hub.
    run_client(
        f"""
        import app, hf_vit_custom
        assert hf_vit_custom.__file__.startswith({str(space_folder)!r}), hf_vit_custom.__file__
        assert type(app.demo).__name__ == "Blocks"
        """,
        tmp_path / "hf_home",
        hub,
        cwd=space_folder,
    )


def test_a_space_for_a_model_that_is_not_on_the_hub_is_refused(hub):
    with pytest.raises(HubError, match="Repository test-user/never-pushed not found"):
        push_demo_space("test-user/never-pushed", "test-user/never-pushed-demo")
    assert "test-user/never-pushed-demo" not in hub.spaces


def test_cli_pushes_the_model_then_its_space(hub, tmp_path, capsys):
    folder = tmp_path / "model"
    save_model(folder, seed=4)
    script = push_to_hub_script()
    assert script.main([str(folder), "--repo_id", "cli-space", "--space_id", "cli-space-demo"]) == 0
    model_url, space_url = capsys.readouterr().out.split()
    assert model_url.endswith(hub.repos["test-user/cli-space"].branches["main"])
    space = hub.spaces["test-user/cli-space-demo"]
    assert space_url.endswith(space.branches["main"])
    assert "build_demo('test-user/cli-space')" in space.commits[space.branches["main"]]["app.py"].decode()
    with pytest.raises(UsageError, match="--space_id needs the model on main"):
        script.main([str(folder), "--repo_id", "cli-space", "--space_id", "cli-space-demo", "--revision", "dev"])


def test_without_gradio_the_cli_pushes_neither_the_model_nor_a_space(hub, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    save_model(folder, seed=5)
    monkeypatch.setitem(sys.modules, "gradio", None)  # not installed
    with pytest.raises(OSError, match=r"The demo needs gradio"):
        push_to_hub_script().main([str(folder), "--repo_id", "no-gradio", "--space_id", "no-gradio-demo"])
    assert "test-user/no-gradio" not in hub.repos and "test-user/no-gradio-demo" not in hub.spaces
