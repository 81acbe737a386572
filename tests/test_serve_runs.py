"""Two trained runs (different heads: 3-class replace, 9-class extend) served from one base in one process."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

import vitlora
from vitlora.cli import main
from vitlora.serve import create_app, load_adapters, running_server


@pytest.fixture(scope="module")
def two_runs(tiny_model, colour_folder, red_folder, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    a, b = root / "colours", root / "raccoon"
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(a), "--epochs", "2",
                 "--quiet", "--lr", "5e-3"]) == 0
    assert main(["train", str(red_folder), "--label", "raccoon", "--model", str(tiny_model), "--out", str(b),
                 "--epochs", "2", "--quiet"]) == 0
    return [a, b]


def test_one_base_many_heads_same_predictions_as_each_run(two_runs, colour_folder):
    adapters = load_adapters(two_runs, device="cpu")
    assert [a.name for a in adapters] == ["colours", "raccoon"]
    assert adapters[0]._base is adapters[1]._base  # the base model is loaded once
    images = [Image.open(p) for p in sorted((colour_folder / "green").iterdir())[:4]]
    for adapter, run_dir in zip(adapters, two_runs):
        expected = vitlora.load(run_dir).predict(images, top_k=3)
        got = adapter.predict(images, top_k=3)
        for e, g in zip(expected, got):
            assert [lab for lab, _ in e.top_k] == [lab for lab, _ in g]
            assert max(abs(x[1] - y[1]) for x, y in zip(e.top_k, g)) < 1e-5
    # switching back and forth does not leak one adapter's head or LoRA into the other
    again = adapters[0].predict(images, top_k=3)
    assert [lab for lab, _ in again[0]] == [lab for lab, _ in adapters[0].predict(images, 3)[0]]
    assert len(adapters[1].labels) == 9 and len(adapters[0].labels) == 3


def test_http_predict_picks_adapter(two_runs, colour_folder):
    app = create_app(load_adapters(two_runs, device="cpu"))
    body = (colour_folder / "red" / "red_000.jpg").read_bytes()
    with running_server(app) as url:
        listed = httpx.get(f"{url}/v1/adapters").json()
        assert [a["name"] for a in listed] == ["colours", "raccoon"] and listed[1]["num_labels"] == 9
        first = httpx.post(f"{url}/v1/predict", content=body).json()
        assert first["adapter"] == "colours" and len(first["top_k"]) == 3
        second = httpx.post(f"{url}/v1/predict?adapter=raccoon&top_k=5", files={"image": ("r.jpg", body)}).json()
        assert second["adapter"] == "raccoon" and len(second["top_k"]) == 5
        expected = vitlora.load(two_runs[1]).predict([Image.open(io.BytesIO(body))], top_k=5)[0].top_k
        assert [s["label"] for s in second["top_k"]] == [lab for lab, _ in expected]
        assert httpx.post(f"{url}/v1/predict?adapter=nope", content=body).status_code == 404
