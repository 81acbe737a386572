"""Model card rendering and hub push, with no real network.

The hub is never contacted: HfApi's mutating methods are replaced by recorders,
and the reachability probe is either bypassed by HF_HUB_OFFLINE or replaced.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, RepoUrl

from vitlora import hub
from vitlora.card import best_val_accuracy, render_model_card
from vitlora.errors import VitloraError

BASE = "facebook/deit-tiny-patch16-224"
SETTINGS = {"mode": "replace", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
            "target_modules": ["q_proj", "v_proj"], "epochs": 3, "lr": 5e-4,
            "batch_size": 16, "license": "apache-2.0", "dataset": "raccoons"}
METRICS = {"epochs": [
    {"epoch": 1, "train_loss": 0.91, "val_loss": 0.62, "val_accuracy": 0.75,
     "images_per_s": 41.2, "wall_s": 12.5},
    {"epoch": 2, "train_loss": 0.41, "val_loss": 0.33, "val_accuracy": 0.9375,
     "images_per_s": 43.0, "wall_s": 11.9},
    {"epoch": 3, "train_loss": 0.22, "val_loss": 0.35, "val_accuracy": 0.875},
]}
LABELS = ["raccoon", "not raccoon", "cat | dog"]


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, "card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


# --- card -------------------------------------------------------------------------------


def test_card_front_matter_parses_with_required_keys():
    card = render_model_card(SETTINGS, METRICS, LABELS, BASE, repo_id="me/raccoons")
    meta = front_matter(card)
    assert meta["base_model"] == BASE
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["tags"] == ["vitlora", "lora", "image-classification"]
    assert meta["license"] == "apache-2.0"
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification"
    assert result["metrics"][0]["type"] == "accuracy"
    assert result["metrics"][0]["value"] == pytest.approx(0.9375)
    # huggingface_hub reads the same metadata back.
    data = ModelCard(card).data
    assert data.base_model == BASE and data.eval_results[0].metric_value == pytest.approx(0.9375)


def test_card_lists_labels_settings_and_metrics():
    card = render_model_card(SETTINGS, METRICS, LABELS, BASE)
    for label in LABELS:
        assert f"`{label}`" in card
    assert "Labels: 3" in card and "**replace**" in card
    assert "| lora_alpha | 16 |" in card and "| target_modules | q_proj, v_proj |" in card
    assert "| 2 | 0.4100 | 0.3300 | 0.9375 | 43.0 | 11.9 |" in card
    assert "| 3 | 0.2200 | 0.3500 | 0.8750 | – | – |" in card  # missing keys tolerated
    assert "Best validation accuracy: **0.9375**" in card
    assert "## Limits" in card


def test_usage_snippets_are_valid_python_and_load_the_adapter():
    card = render_model_card(SETTINGS, METRICS, LABELS, BASE, repo_id="me/raccoons")
    blocks = python_blocks(card)
    assert len(blocks) == 2
    for block in blocks:
        compile(block, "<card>", "exec")
    tree = ast.parse(blocks[0])
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"AutoModelForImageClassification.from_pretrained", "PeftModel.from_pretrained",
            "AutoImageProcessor.from_pretrained"} <= calls
    assert "ignore_mismatched_sizes=True" in blocks[0]
    assert "'me/raccoons'" in blocks[0] and repr(LABELS) in blocks[0]
    assert "vitlora.load('me/raccoons').predict(" in blocks[1]


def test_extend_with_many_labels_lists_only_new_ones():
    base_labels = [f"class {i}" for i in range(1000)]
    new = ["raccoon", "opossum"]
    card = render_model_card({"mode": "extend"}, {}, base_labels + new, BASE, new_labels=new)
    assert "`raccoon`, `opossum` + the base model's 1000" in card
    assert "`class 5`" not in card
    assert "model-index" not in front_matter(card)  # no metrics, no result to claim
    code = python_blocks(card)[0]
    compile(code, "<card>", "exec")
    assert "range(1000)" in code and "AutoConfig.from_pretrained(base)" in code


def test_card_robust_to_missing_metrics_and_local_base():
    card = render_model_card({}, {"epochs": [{"epoch": 1}]}, ["a", "b"], "/models/deit-tiny")
    meta = front_matter(card)
    assert "base_model" not in meta and "license" not in meta
    assert "No per-epoch metrics" not in card and "| 1 | – | – | – |" in card
    assert "local folder" in card
    assert best_val_accuracy({"epochs": [{"val_accuracy": None}]}) is None


def test_best_val_accuracy_prefers_the_kept_epoch():
    # The saved adapter is the best epoch's; if the run recorded which, advertise that one.
    metrics = {"epochs": METRICS["epochs"], "best_epoch": 3, "best_val_accuracy": 0.875}
    assert best_val_accuracy(metrics) == 0.875
    assert best_val_accuracy(METRICS) == 0.9375
    card = render_model_card({"data": "/home/me/photos/raccoons"}, metrics, LABELS, BASE)
    result = front_matter(card)["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == 0.875
    assert result["dataset"]["name"] == "raccoons"


# --- push -------------------------------------------------------------------------------


@pytest.fixture
def hf_calls(monkeypatch):
    """Record HfApi calls instead of making them."""
    calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        calls.append(("create_repo", args, kwargs))
        repo_id = args[0] if args else kwargs["repo_id"]
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *args, **kwargs):
        folder = Path(kwargs["folder_path"])  # a temporary copy: keep what would have been uploaded
        kwargs["files"] = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", args, kwargs))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    for name in ("create_commit", "upload_file", "preupload_lfs_files"):
        monkeypatch.setattr(HfApi, name, lambda self, *a, _n=name, **k: calls.append((_n, a, k)))
    return calls


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-1").mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    (run / "adapter_model.safetensors").write_bytes(b"x")
    (run / "vitlora.json").write_text(json.dumps({"base_model": "/home/me/models/deit-tiny",
                                                  "config": {"data": "/home/me/photos", "out": "runs/r"}}))
    (run / "checkpoints" / "epoch-1" / "adapter_model.safetensors").write_bytes(b"x")
    return run


def test_push_offline_fails_before_touching_anything(run_dir, hf_calls, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "get_session", lambda: pytest.fail("the hub must not be contacted"))
    with pytest.raises(VitloraError) as err:
        hub.push_run(run_dir, "me/raccoons", token="hf_x")
    msg = str(err.value)
    assert msg.startswith("cannot reach the Hugging Face hub (")
    assert "check your connection or HF_HUB_OFFLINE; nothing was uploaded" in msg
    assert "\n" not in msg
    assert hf_calls == []


def test_push_unreachable_hub_fails_before_touching_anything(run_dir, hf_calls, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)

    class DeadSession:
        def head(self, url, timeout):
            assert timeout <= 5
            raise ConnectionError("no route")

    monkeypatch.setattr(hub, "get_session", DeadSession)
    with pytest.raises(VitloraError, match="cannot reach the Hugging Face hub .*nothing was uploaded"):
        hub.push_run(run_dir, "me/raccoons", token="hf_x")
    assert hf_calls == []


@pytest.mark.parametrize("remove", ["adapter_config.json", "vitlora.json"])
def test_push_non_run_folder_fails(run_dir, hf_calls, monkeypatch, remove):
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: pytest.fail("checked the hub first"))
    (run_dir / remove).unlink()
    with pytest.raises(VitloraError, match=f"not a vitlora run folder.*{remove}"):
        hub.push_run(run_dir, "me/raccoons", token="hf_x")
    with pytest.raises(VitloraError, match="run directory not found"):
        hub.push_run(run_dir / "does-not-exist", "me/raccoons", token="hf_x")
    assert hf_calls == []


def test_push_without_token_fails(run_dir, hf_calls, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(VitloraError, match="hf auth login"):
        hub.push_run(run_dir, "me/raccoons")
    assert hf_calls == []


def test_push_invalid_repo_id_fails(run_dir, hf_calls, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: pytest.fail("checked the hub first"))
    with pytest.raises(VitloraError, match="invalid hub repo id"):
        hub.push_run(run_dir, "not a repo id", token="hf_x")
    assert hf_calls == []


def test_push_creates_repo_and_uploads_artifacts(run_dir, hf_calls, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)

    class Response:
        status_code = 200

    probed: list[str] = []

    class LiveSession:
        def head(self, url, timeout):
            probed.append(url)
            assert timeout <= 5
            return Response()

    monkeypatch.setattr(hub, "get_session", LiveSession)
    url = hub.push_run(str(run_dir), "me/raccoons", private=True, token="hf_secret")
    assert url == "https://huggingface.co/me/raccoons"
    assert probed == [hub.constants.ENDPOINT]
    assert [name for name, _, _ in hf_calls] == ["create_repo", "upload_folder"]

    _, args, kwargs = hf_calls[0]
    assert (args[0] if args else kwargs["repo_id"]) == "me/raccoons"
    assert kwargs["private"] is True and kwargs["exist_ok"] is True
    assert kwargs["token"] == "hf_secret"

    _, args, kwargs = hf_calls[1]
    assert kwargs["repo_id"] == "me/raccoons"
    assert Path(kwargs["folder_path"]).name == run_dir.name
    assert set(kwargs["files"]) == {"adapter_config.json", "adapter_model.safetensors", "vitlora.json"}
    pushed = json.loads(kwargs["files"]["vitlora.json"])  # no absolute local paths leave the machine
    assert pushed == {"base_model": "deit-tiny", "config": {"data": "photos", "out": "runs/r"}}
    assert "/home/me" in (run_dir / "vitlora.json").read_text()  # the run itself is not changed
    assert kwargs["token"] == "hf_secret"
    assert "checkpoints/*" in kwargs["ignore_patterns"]


def test_ignore_patterns_keep_artifacts_and_drop_checkpoints(run_dir):
    # Same filtering huggingface_hub applies inside upload_folder.
    from huggingface_hub.utils import filter_repo_objects

    files = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    kept = set(filter_repo_objects(files, ignore_patterns=hub.IGNORE_PATTERNS))
    assert kept == {"adapter_config.json", "adapter_model.safetensors", "vitlora.json"}


def test_push_reports_hub_errors_as_vitlora_error(run_dir, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("403 Forbidden:\nyou cannot write to me/raccoons")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(VitloraError, match="403 Forbidden: you cannot write") as err:
        hub.push_run(run_dir, "me/raccoons", token="hf_x")
    assert "\n" not in str(err.value)


def test_card_strips_absolute_paths_and_survives_any_label_text():
    settings = {"data": "/home/me/photos/raccoons", "negatives": "/home/me/negs", "out": "runs/r", "rank": 8}
    metrics = {"epochs": METRICS["epochs"], "extend": {"negatives": "/home/me/negs"}}
    labels = ["caf\udce9", "ok"]  # a Latin-1 folder name as os.fsdecode keeps it
    card = render_model_card(settings, metrics, labels, "/home/me/models/deit-tiny", new_labels=["caf\udce9"])
    assert "/home/me" not in card
    assert "raccoons" in card and "negs" in card and "runs/r" in card and "deit-tiny" in card
    assert "caf\ufffd" in card
    card.encode("utf-8")  # writable as the README.md of the run
