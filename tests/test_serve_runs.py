"""Two trained runs (different heads: 3-class replace, 9-class extend) served from one base in one process."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import vitlora
from vitlora.cli import main
from vitlora.errors import VitloraError
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
    assert adapters[0].batch_group is adapters[1].batch_group  # the base model is loaded once
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


def _colour_images(colour_folder: Path, n: int = 6) -> list[Image.Image]:
    paths = [p for c in ("red", "green", "blue") for p in sorted((colour_folder / c).iterdir())[:2]]
    return [Image.open(p) for p in paths[:n]]


def _mixed_batch(two_runs, colour_folder) -> tuple[list, object, list[Image.Image], list[str]]:
    """Both runs loaded as one batch group, and six photos with the adapter each row asks for."""
    adapters = load_adapters(two_runs, device="cpu")
    names = ["colours", "raccoon", "raccoon", "colours", "raccoon", "colours"]
    return adapters, adapters[0].batch_group, _colour_images(colour_folder), names


def test_mixed_batch_equals_single_adapter_runs(two_runs, colour_folder):
    """One forward pass over rows of both adapters = each row run alone through its own adapter (fp32)."""
    adapters, group, images, names = _mixed_batch(two_runs, colour_folder)
    mixed = group.predict_mixed(images, names, top_k=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # the two LoRAs really differ, so a row given the wrong one would show
        feats = [group.model(pixel_values=x, adapter_names=[n, n]).logits for n in ("colours", "raccoon")]
    assert (feats[0] - feats[1]).abs().max() > 1e-4
    assert group.stacked == {"colours": 0, "raccoon": 1}  # mixed batches take the stacked-LoRA path
    runs = {name: vitlora.load(run, precision="fp32") for name, run in zip(["colours", "raccoon"], two_runs)}
    by_name = {a.name: a for a in adapters}
    for image, name, got in zip(images, names, mixed):
        alone = runs[name].predict([image], top_k=3)[0].top_k  # the run loaded on its own, merged
        assert [lab for lab, _ in got] == [lab for lab, _ in alone]
        assert max(abs(g[1] - a[1]) for g, a in zip(got, alone)) < 1e-5
        assert by_name[name].predict([image], top_k=3)[0] == got or all(
            abs(x[1] - y[1]) < 1e-6 for x, y in zip(by_name[name].predict([image], top_k=3)[0], got))


def test_http_mixed_requests_and_v2_agree_with_direct(two_runs, colour_folder, tiny_model):
    adapters = load_adapters(two_runs, device="cpu")
    app = create_app(adapters, max_wait_ms=50)
    bodies = [p.read_bytes() for c in ("red", "green", "blue") for p in sorted((colour_folder / c).iterdir())[:2]]
    names = ["colours", "raccoon"] * 3
    expected = {
        (i, n): vitlora.load(run).predict([Image.open(io.BytesIO(bodies[i]))], top_k=3)[0].top_k
        for i in range(6) for n, run in zip(["colours", "raccoon"], two_runs)
    }

    async def concurrently(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(
                c.post(f"/v1/predict?adapter={n}&top_k=3", content=b) for n, b in zip(names, bodies)))

    with running_server(app) as url:
        responses = asyncio.run(concurrently(url))
        for i, (name, r) in enumerate(zip(names, responses)):
            assert r.status_code == 200 and r.json()["adapter"] == name
            assert [s["label"] for s in r.json()["top_k"]] == [lab for lab, _ in expected[(i, name)]]
        request = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                               "data": [base64.b64encode(b).decode() for b in bodies[:2]]}],
                   "parameters": {"top_k": 3}}
        v2 = httpx.post(f"{url}/v2/models/raccoon/infer", json=request, timeout=30).json()
        assert v2["outputs"][0]["shape"] == [2, 3]
        assert v2["outputs"][0]["data"][:3] == [lab for lab, _ in expected[(0, "raccoon")]]
        served = httpx.get(f"{url}/v1/adapters").text + httpx.get(f"{url}/v2/models/colours").text
    assert str(tiny_model) not in served and str(two_runs[0].parent) not in served  # no local paths
    assert json.loads(served.split("]")[0] + "]")[0]["base_model"] == tiny_model.name


def test_run_with_labels_that_do_not_fit_its_head_is_refused(two_runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(two_runs[0], broken)
    labels = json.loads((broken / "labels.json").read_text())
    labels["id2label"] = {"0": "only-one"}
    labels["label2id"] = {"only-one": 0}
    (broken / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(VitloraError, match="labels.json names 1 labels but the trained head has 3 outputs"):
        load_adapters([two_runs[1], broken], device="cpu")
    assert main(["serve", str(broken), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labels.json" in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_bad_port_is_one_line_error(two_runs, port, capsys):
    assert main(["serve", str(two_runs[0]), "--device", "cpu", "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"vitlora serve: error: --port must be between 1 and 65535, got {port}"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _overlay(answer: dict) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert answer["explanation"].startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(answer["explanation"][len(prefix):])))


def _ranked(answer: dict) -> list[tuple[str, float]]:
    return [(s["label"], s["score"]) for s in answer["top_k"]]


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int)).max())


def test_http_explain_draws_the_runs_own_gradcam(two_runs, colour_folder):
    """?explain=true: the top-1's Grad-CAM over the photo, as the run loaded on its own draws it (fp32)."""
    from vitlora.explain import explain_image, overlay_png
    from vitlora.serve.upload import decode_image

    photo = Image.open(sorted((colour_folder / "red").iterdir())[1]).convert("RGB")  # 40x36, under the 768 cap
    small, wide = _png(photo), _png(photo.resize((1200, 600)))
    with running_server(create_app(load_adapters(two_runs, device="cpu"))) as url:
        assert [a["explain"] for a in httpx.get(f"{url}/v1/adapters").json()] == [True, True]
        for name, run_dir in zip(["colours", "raccoon"], two_runs):
            plain = httpx.post(f"{url}/v1/predict?adapter={name}", content=small, timeout=30).json()
            got = httpx.post(f"{url}/v1/predict?adapter={name}&explain=true", content=small, timeout=30).json()
            assert plain["explanation"] is None and got["top_k"] == plain["top_k"]
            overlay = _overlay(got)
            assert overlay.format == "PNG" and overlay.size == photo.size
            run = vitlora.load(run_dir, precision="fp32")
            heat, _ = explain_image(run, decode_image(small), got["top_k"][0]["label"])
            expected = Image.open(io.BytesIO(overlay_png(photo, heat)))
            assert _max_diff(overlay, expected) <= 2  # merged vs. unmerged LoRA: float noise only
            assert _max_diff(overlay, photo) > 20  # heat was drawn, not just the photo sent back
        big = _overlay(httpx.post(f"{url}/v1/predict?explain=true", content=wide, timeout=30).json())
        assert big.format == "PNG" and max(big.size) == 768 and big.width * 600 == big.height * 1200


def test_explain_holds_the_batch_lock_and_concurrent_predictions_are_unchanged(two_runs, colour_folder):
    adapters, group, images, names = _mixed_batch(two_runs, colour_folder)
    alone = group.predict_mixed(images, names, top_k=3)
    locked: list[bool] = []
    hook = group.heads["raccoon"].register_forward_hook(lambda *_: locked.append(group.lock.locked()))
    try:
        adapters[1].explain(images[0], adapters[1].labels[0])
    finally:
        hook.remove()
    assert locked == [True]  # the explain's forward runs under the lock every batch's forward takes

    bodies = [_png(im.convert("RGB")) for im in images]
    app = create_app(adapters, max_wait_ms=50)
    with running_server(app) as url:
        explained = {n: httpx.post(f"{url}/v1/predict?adapter={n}&explain=true", content=bodies[0], timeout=30).json()
                     for n in ("colours", "raccoon")}

        async def together() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                explains = [c.post(f"/v1/predict?adapter={n}&explain=true", content=bodies[0]) for n in explained]
                plain = [c.post(f"/v1/predict?adapter={n}&top_k=3", content=b) for n, b in zip(names, bodies)]
                return await asyncio.gather(*explains, *plain)

        responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    pairs = [(_ranked(before), r) for before, r in zip(explained.values(), responses[:2])]
    for (before, r), first in zip(pairs, explained.values()):
        assert _max_diff(_overlay(r.json()), _overlay(first)) <= 1
    for expected, r in [*pairs, *zip(alone, responses[2:])]:  # same answers as alone (batching: float noise)
        got = _ranked(r.json())
        assert [lab for lab, _ in got] == [lab for lab, _ in expected[:len(got)]]
        assert max(abs(g[1] - e[1]) for g, e in zip(got, expected)) < 1e-5
