"""Behavioural tests for vitlora.data: discovery, decoding, transforms, cache.

Images are generated with Pillow under tmp_path; the processor-equivalence
test also uses the shared DeiT-tiny config and raccoon photos when present.
"""

from __future__ import annotations

import gc
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
import torch.nn.functional as F

from vitlora.data import (
    DataSource,
    ImageCache,
    Preprocess,
    Sample,
    SkipReport,
    build_cache,
    discover,
    expand_image_paths,
    iterate_batches,
    load_rgb,
    normalize,
    random_resized_crop_flip,
    resize_for_eval,
    resize_for_train,
    stratified_split,
    stream_decoded,
)
from vitlora.data.transforms import _crop_boxes
from vitlora.errors import BadImageError, VitloraError

SHARED_MODEL = Path("/work/shared/models/deit-tiny-patch16-224")
SHARED_PHOTOS = Path("/work/shared/data/raccoon")

VIT = Preprocess(224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resample=3)
SMALL = Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resample=2)


def noise(w: int, h: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth(w: int, h: int, seed: int = 0) -> PIL.Image.Image:
    """Photo-like (low-frequency) content, so JPEG draft decoding is meaningful."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((w, h), PIL.Image.BICUBIC)


def write(path: Path, img: PIL.Image.Image | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or noise(8, 8)).save(path, **save)
    return path


# ------------------------------------------------------------------ discover


def test_imagefolder_recursive_sorted_hidden_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write(root / "dog" / "b.JPG", format="JPEG")
    write(root / "dog" / "a.png")
    write(root / "dog" / "sub" / "deep" / "c.webp")
    write(root / "cat" / "z.tiff")
    write(root / "cat" / ".hidden.png")
    write(root / "cat" / ".cache" / "x.png")
    write(root / ".git" / "y.png")
    (root / "cat" / "notes.txt").write_text("hi")
    (root / "README.md").write_text("x")

    ds = discover(str(root))
    assert ds.kind == "imagefolder"
    assert ds.labels == ["cat", "dog"]
    assert ds.root == str(root)
    assert [(os.path.relpath(s.path, root), s.label) for s in ds.samples] == [
        ("cat/z.tiff", "cat"),
        ("dog/a.png", "dog"),
        ("dog/b.JPG", "dog"),
        ("dog/sub/deep/c.webp", "dog"),
    ]
    assert ds.ignored_files == 2  # notes.txt, README.md
    assert all(s.image is None for s in ds.samples)


def test_imagefolder_rejects_label_and_empty_class(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write(root / "a" / "1.png")
    write(root / "b" / "1.png")
    write(root / "c" / "1.png")
    with pytest.raises(VitloraError) as e:
        discover(str(root), label="x")
    assert str(e.value) == f"--label is for a flat folder of one class; {root} is an ImageFolder with classes a, b, c"

    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(VitloraError, match=r"class folder .*empty has no images"):
        discover(str(root))


def test_flat_folder_needs_label(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for n in ("b.jpg", "a.png", "c.bmp"):
        write(root / n)
    (root / "LICENSE").write_text("x")
    with pytest.raises(VitloraError, match=r"--label NAME"):
        discover(str(root))
    ds = discover(str(root), label="raccoon")
    assert ds.kind == "flat"
    assert ds.labels == ["raccoon"]
    assert [os.path.basename(s.path) for s in ds.samples] == ["a.png", "b.jpg", "c.bmp"]
    assert {s.label for s in ds.samples} == {"raccoon"}
    assert ds.ignored_files == 1


def test_flat_folder_with_imageless_subfolder_is_flat(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write(root / "a.png")
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "x.txt").write_text("x")
    assert discover(str(root), label="x").kind == "flat"


def test_mixed_layout_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "top.png")
    write(tmp_path / "cls" / "a.png")
    with pytest.raises(VitloraError, match="mixes 1 image at the top level with class folders cls"):
        discover(str(tmp_path))


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(VitloraError) as e:
        discover(str(tmp_path / "nope"))
    assert str(e.value) == f"data not found: {tmp_path / 'nope'}"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("x")
    with pytest.raises(VitloraError) as e:
        discover(str(tmp_path / "e"))
    assert str(e.value) == f"no images found in {tmp_path / 'e'}"
    f = write(tmp_path / "one.png")
    with pytest.raises(VitloraError, match="is a file; expected a folder"):
        discover(str(f))


def test_csv_manifest_relative_paths(tmp_path: Path) -> None:
    write(tmp_path / "imgs" / "a.png")
    write(tmp_path / "imgs" / "b.png")
    m = tmp_path / "sets" / "train.csv"
    m.parent.mkdir()
    m.write_text("id,path,label,notes\n1,../imgs/a.png,cat,x\n\n2,../imgs/b.png,dog,y\n3,../imgs/gone.png,dog,\n")
    ds = discover(str(m))
    assert ds.kind == "manifest"
    assert ds.labels == ["cat", "dog"]
    assert ds.root == str(m.parent)
    assert [s.label for s in ds.samples] == ["cat", "dog", "dog"]
    assert os.path.samefile(ds.samples[0].path, tmp_path / "imgs" / "a.png")
    # a referenced file that does not exist is the decoder's business, not discovery's
    assert not os.path.exists(ds.samples[2].path)


@pytest.mark.parametrize(
    "text, where",
    [
        ("path,klass\na.png,cat\n", "line 1: missing column(s) label"),
        ("path,label\na.png,cat\nb.png\n", "line 3: expected 2 fields, got 1"),
        ("path,label\na.png,cat\n,dog\n", "line 3: empty path"),
        ("", "is empty"),
    ],
)
def test_csv_manifest_errors(tmp_path: Path, text: str, where: str) -> None:
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(VitloraError) as e:
        discover(str(m))
    assert where in str(e.value)
    assert str(m) in str(e.value)


def test_jsonl_manifest(tmp_path: Path) -> None:
    write(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.png", "label": "cat"}\n\n{"path": "sub/b.png", "label": 3, "extra": 1}\n')
    ds = discover(str(m))
    assert [(s.path, s.label) for s in ds.samples] == [
        (str(tmp_path / "a.png"), "cat"),
        (str(tmp_path / "sub" / "b.png"), "3"),
    ]
    assert ds.labels == ["3", "cat"]


@pytest.mark.parametrize(
    "text, where",
    [
        ('{"path": "a.png", "label": "x"}\n{"path": "b.png", "label": \n', "line 2: not valid JSON"),
        ('{"path": "a.png", "label": "x"}\n\n{"path": "b.png"}\n', "line 3: missing 'label'"),
        ('["a.png", "x"]\n', "line 1: expected an object"),
    ],
)
def test_jsonl_manifest_errors(tmp_path: Path, text: str, where: str) -> None:
    m = tmp_path / "m.jsonl"
    m.write_text(text)
    with pytest.raises(VitloraError, match=where):
        discover(str(m))


# ------------------------------------------------------------------------ hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    imgs = []
    for c in colors:
        buf = io.BytesIO()
        PIL.Image.new("RGB", (5, 4), c).save(buf, format="PNG")
        imgs.append({"bytes": buf.getvalue(), "path": None})
    feats = datasets.Features(
        {"img": datasets.Image(), "lbl": datasets.ClassLabel(names=["zebra", "ant"]), "n": datasets.Value("int32")}
    )
    ds = datasets.Dataset.from_dict({"img": imgs, "lbl": [0, 1, 0, 1, 0, -1], "n": list(range(6))}, features=feats)
    single = root / "single"
    ds.save_to_disk(str(single))
    dd = root / "dict"
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(dd))
    return str(single), str(dd)


def test_hf_save_to_disk(hf_dirs: tuple[str, str]) -> None:
    single, dd = hf_dirs
    ds = discover(f"hf:{dd}/train")
    assert ds.kind == "hf"
    assert ds.labels == ["ant", "zebra"]
    assert [s.label for s in ds.samples] == ["zebra", "ant", "zebra", "ant", "zebra", None]
    assert ds.samples[3].path == f"hf:{dd}/train#3"
    assert np.asarray(load_rgb(ds.samples[1].image))[0, 0].tolist() == [0, 255, 0]

    assert len(discover(f"hf:{dd}/test").samples) == 2
    assert len(discover(f"hf:{single}/train").samples) == 6


@pytest.mark.parametrize(
    "split, ids",
    [
        ("train[:2]", [0, 1]),
        ("train[4:]", [4, 5]),
        ("train[-2:]", [4, 5]),
        ("train[1:3]", [1, 2]),
        ("train[50%:]", [3, 4, 5]),
    ],
)
def test_hf_slicing(hf_dirs: tuple[str, str], split: str, ids: list[int]) -> None:
    _, dd = hf_dirs
    ds = discover(f"hf:{dd}/{split}")
    assert [s.path.rsplit("#", 1)[1] for s in ds.samples] == [str(i) for i in ids]
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    got = [tuple(np.asarray(load_rgb(s.image))[0, 0].tolist()) for s in ds.samples]
    assert got == [expected[i] for i in ids]


def test_hf_errors(hf_dirs: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, dd = hf_dirs
    with pytest.raises(VitloraError, match="--label is for a flat folder"):
        discover(f"hf:{dd}/train", label="x")
    with pytest.raises(VitloraError, match="has no split 'validation'; it has test, train"):
        discover(f"hf:{dd}/validation")
    with pytest.raises(VitloraError, match=r"expected hf:NAME\[:CONFIG\]/SPLIT"):
        discover("hf:beans")

    import datasets

    def offline(*a, **k):
        try:
            raise FileNotFoundError("Dataset beans is not cached")
        except FileNotFoundError as e:
            raise ConnectionError("Couldn't reach 'beans' on the Hub (LocalEntryNotFoundError)") from e

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(VitloraError) as e:
        discover("hf:user/beans:cfg/train[:10]")
    msg = str(e.value)
    assert "hub is unreachable" in msg and "local folder" in msg and "\n" not in msg

    seen = {}

    def record(name, config, split):
        seen.update(name=name, config=config, split=split)
        raise ValueError('Unknown split "x"')

    monkeypatch.setattr(datasets, "load_dataset", record)
    with pytest.raises(VitloraError, match='could not load .*Unknown split "x"'):
        discover("hf:user/beans:cfg/train[:10]")
    assert seen == {"name": "user/beans", "config": "cfg", "split": "train[:10]"}


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(VitloraError, match=r"pip install 'vitlora\[datasets\]'"):
        discover("hf:beans/train")


# ------------------------------------------------------------ expand / split


def test_expand_image_paths(tmp_path: Path) -> None:
    a = write(tmp_path / "a.png")
    raw = tmp_path / "shot.raw"
    raw.write_bytes(b"whatever")  # explicit file: kept, the decoder decides
    write(tmp_path / "dir" / "x.jpg")
    write(tmp_path / "dir" / "sub" / "y.png")
    (tmp_path / "dir" / "n.txt").write_text("x")
    write(tmp_path / "g" / "1.png")
    write(tmp_path / "g" / "2.png")
    out = expand_image_paths([str(a), str(raw), str(tmp_path / "dir"), str(tmp_path / "g" / "*.png"), str(a)])
    assert out == [
        str(a),
        str(raw),
        str(tmp_path / "dir" / "sub" / "y.png"),
        str(tmp_path / "dir" / "x.jpg"),
        str(tmp_path / "g" / "1.png"),
        str(tmp_path / "g" / "2.png"),
    ]
    with pytest.raises(VitloraError, match="no such file or folder: .*missing.png"):
        expand_image_paths([str(a), str(tmp_path / "missing.png")])
    with pytest.raises(VitloraError, match=r"no images match .*\*.gif"):
        expand_image_paths([str(tmp_path / "*.gif")])


def _samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(f"{lab}/{i}.png", lab) for lab, n in counts.items() for i in range(n)]


def test_stratified_split() -> None:
    samples = _samples({"a": 50, "b": 10, "c": 2, "d": 1})
    train, val = stratified_split(samples, 0.2, seed=1)
    count = lambda xs, lab: sum(s.label == lab for s in xs)  # noqa: E731
    assert [count(val, lab) for lab in "abcd"] == [10, 2, 1, 0]
    assert [count(train, lab) for lab in "abcd"] == [40, 8, 1, 1]
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(samples)
    # stable order: both lists are subsequences of the input
    pos = {s: i for i, s in enumerate(samples)}
    assert [pos[s] for s in train] == sorted(pos[s] for s in train)
    assert [pos[s] for s in val] == sorted(pos[s] for s in val)
    # deterministic per seed, different across seeds
    assert stratified_split(samples, 0.2, seed=1) == (train, val)
    assert stratified_split(samples, 0.2, seed=2)[1] != val


def test_stratified_split_edges() -> None:
    assert stratified_split(_samples({"a": 2}), 0.01, 0)[1].__len__() == 1  # at least one held out
    tr, va = stratified_split(_samples({"a": 3}), 0.99, 0)
    assert (len(tr), len(va)) == (1, 2)  # never all
    tr, va = stratified_split(_samples({"a": 5}), 0.0, 0)
    assert (len(tr), len(va)) == (5, 0)
    unl = [Sample(f"{i}.png", None) for i in range(10)]
    assert len(stratified_split(unl, 0.3, 0)[1]) == 3
    with pytest.raises(VitloraError):
        stratified_split(unl, 1.0, 0)


# -------------------------------------------------------------------- decode


def _pixel(src) -> list[int]:
    return np.asarray(load_rgb(src))[0, 0].tolist()


def _transformers_pixels(path: Path) -> np.ndarray:
    from transformers.image_utils import load_image

    return np.asarray(load_image(str(path)))


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("L", lambda: PIL.Image.new("L", (3, 2), 100), [100, 100, 100]),
        ("LA", lambda: PIL.Image.new("LA", (3, 2), (100, 0)), [100, 100, 100]),
        ("RGBA", lambda: PIL.Image.new("RGBA", (3, 2), (10, 20, 30, 0)), [10, 20, 30]),
        ("1", lambda: PIL.Image.new("1", (3, 2), 1), [255, 255, 255]),
        ("CMYK", lambda: PIL.Image.new("CMYK", (3, 2), (0, 0, 0, 0)), [255, 255, 255]),
        ("CMYK-black", lambda: PIL.Image.new("CMYK", (3, 2), (0, 0, 0, 255)), [0, 0, 0]),
        ("CMYK-cyan", lambda: PIL.Image.new("CMYK", (3, 2), (255, 0, 0, 0)), [0, 255, 255]),
    ],
)
def test_modes_match_transformers(tmp_path: Path, mode: str, make, expected: list[int]) -> None:
    img = make()
    path = tmp_path / ("x.tiff" if img.mode == "CMYK" else "x.png")
    img.save(path)
    out = load_rgb(str(path))
    assert out.mode == "RGB" and out.size == (3, 2)
    assert np.asarray(out)[1, 2].tolist() == expected
    assert np.array_equal(np.asarray(out), _transformers_pixels(path))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # raised by transformers' path, not ours
def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    for name, trns in (("p.png", None), ("pt.png", 0), ("pb.png", bytes([0, 128]))):
        img = PIL.Image.new("P", (2, 1))
        img.putpalette([200, 10, 20, 5, 250, 7] + [0] * 762)
        img.putpixel((1, 0), 1)
        if trns is not None:
            img.info["transparency"] = trns
        img.save(tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # our path converts without Pillow's palette warning
            out = np.asarray(load_rgb(str(tmp_path / name)))
        assert out[0].tolist() == [[200, 10, 20], [5, 250, 7]]
        assert np.array_equal(out, _transformers_pixels(tmp_path / name))


def test_high_bit_depth_is_scaled_not_clipped(tmp_path: Path) -> None:
    vals = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    PIL.Image.fromarray(vals).save(tmp_path / "g16.png")
    assert PIL.Image.open(tmp_path / "g16.png").mode == "I;16"
    out = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()
    # deliberate deviation: plain convert("RGB") (what transformers does) clips 257..65535 to white
    assert _transformers_pixels(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 255, 255, 255]

    as_int = PIL.Image.fromarray(vals.astype(np.int32))
    assert as_int.mode == "I"
    assert _pixel(as_int) == [0, 0, 0] and np.asarray(load_rgb(as_int))[0, 3].tolist() == [255] * 3
    small_int = PIL.Image.fromarray(np.array([[7, 200]], dtype=np.int32))
    assert np.asarray(load_rgb(small_int))[0, :, 0].tolist() == [7, 200]
    as_float = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_rgb(as_float))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = noise(30, 20)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_rgb(str(tmp_path / "r.jpg"))
    assert out.size == (20, 30)
    assert np.array_equal(np.asarray(out), _transformers_pixels(tmp_path / "r.jpg"))


def test_sources_other_than_paths(tmp_path: Path) -> None:
    img = PIL.Image.new("RGB", (4, 4), (1, 2, 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write(tmp_path / "f.png", img)
    assert _pixel(buf.getvalue()) == [1, 2, 3]
    assert _pixel({"bytes": buf.getvalue(), "path": "ignored"}) == [1, 2, 3]
    assert _pixel({"bytes": None, "path": str(tmp_path / "f.png")}) == [1, 2, 3]
    assert _pixel(img.convert("L")) == [2, 2, 2]


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = write(tmp_path / "good.jpg", smooth(64, 48), quality=90)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.jpg"
    text.write_text("this is not an image\n")
    bomb = write(tmp_path / "bomb.png", PIL.Image.new("RGB", (70, 70)))  # 4900 px
    return {"good": good, "trunc": trunc, "text": text, "missing": tmp_path / "missing.jpg", "bomb": bomb}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_images_reasons_and_bomb_not_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _bad_files(tmp_path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 4000)
    loads: list[tuple[int, int]] = []
    real_load = PIL.ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", spy)
    reasons = {}
    for k in ("trunc", "text", "missing", "bomb"):
        with pytest.raises(BadImageError) as e:
            load_rgb(str(files[k]))
        reasons[k] = str(e.value)
    assert reasons["trunc"] == "truncated"
    assert reasons["text"] == "not an image"
    assert reasons["missing"] == "file not found"
    assert reasons["bomb"] == "too large: 70x70 pixels (limit 4000)"
    assert (70, 70) not in loads  # header check happened before any decoding
    # far above the limit Pillow itself refuses at open(); still the same kind of reason
    big = write(tmp_path / "huge.png", PIL.Image.new("RGB", (100, 100)))
    with pytest.raises(BadImageError, match="^too large"):
        load_rgb(str(big))
    assert load_rgb(str(files["good"])).size == (64, 48)
    assert (64, 48) in loads  # the spy does see real decodes


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_cache_skips_and_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 200 * 200)
    files = _bad_files(tmp_path)
    bomb = write(tmp_path / "bomb2.png", PIL.Image.new("RGB", (250, 200)))
    order = ["good", "trunc", "text", "missing"]
    samples = [Sample(str(files[k]), "x") for k in order] + [Sample(str(bomb), "x"), Sample(str(files["good"]), "x")]
    cache, report = build_cache(samples, {"x": 0}, SMALL, train=False)
    assert len(cache) == 2 and cache.paths == [str(files["good"])] * 2
    assert report.total == 6 and report.count == 4
    assert report.summary() == (
        f"skipped 4 of 6 images: {files['trunc']} (truncated), {files['text']} (not an image), "
        f"{files['missing']} (file not found), and 1 more"
    )
    assert report.skipped[3] == (str(bomb), "too large: 250x200 pixels (limit 40000)")
    with pytest.raises(BadImageError, match="skipped 4 of 6 images: .*trunc.jpg \\(truncated\\)"):
        build_cache(samples, {"x": 0}, SMALL, train=False, strict=True)
    with pytest.raises(VitloraError, match="no readable images in"):
        build_cache(samples[1:4], {"x": 0}, SMALL, train=False)


def test_skip_report() -> None:
    r = SkipReport(total=150)
    assert r.summary() == "" and r.count == 0
    r.add("a.jpg", "truncated")
    r.add("b.jpg", "not an image")
    assert r.summary() == "skipped 2 of 150 images: a.jpg (truncated), b.jpg (not an image)"
    r.add("c.jpg", "file not found")
    assert r.summary(max_paths=1) == "skipped 3 of 150 images: a.jpg (truncated), and 2 more"


def test_jpeg_draft_decoding(tmp_path: Path) -> None:
    big = write(tmp_path / "big.jpg", smooth(1000, 960), quality=92)
    full = load_rgb(str(big))
    drafted = load_rgb(str(big), draft=(224, 224))
    assert full.size == (1000, 960)
    assert drafted.size == (500, 480)  # 1/2 scale keeps >= 2x the 224 target
    a = resize_for_eval(full, VIT).int()
    b = resize_for_eval(drafted, VIT).int()
    diff = (a - b).abs()
    assert diff.float().mean() < 1.0 and diff.max() <= 8  # documented: a few levels at most
    # too small for a reduced scale, or not a JPEG: untouched
    assert load_rgb(str(big), draft=(400, 400)).size == (1000, 960)
    png = write(tmp_path / "big.png", smooth(1000, 960))
    assert load_rgb(str(png), draft=(224, 224)).size == (1000, 960)


# ---------------------------------------------------------------- transforms


def _processor_pixels(processor, paths_or_imgs) -> torch.Tensor:
    from transformers.image_utils import load_image

    images = [load_image(p) if isinstance(p, str) else p for p in paths_or_imgs]
    return processor(images, return_tensors="pt").pixel_values


def _ours(pp: Preprocess, paths_or_imgs) -> torch.Tensor:
    return normalize(torch.stack([resize_for_eval(load_rgb(p), pp) for p in paths_or_imgs]), pp)


@pytest.mark.skipif(not SHARED_MODEL.is_dir() or not SHARED_PHOTOS.is_dir(), reason="shared DeiT/raccoon missing")
def test_processor_equivalence_on_real_photos() -> None:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(SHARED_MODEL))
    pp = Preprocess.from_pretrained(str(SHARED_MODEL))
    assert pp == Preprocess.from_processor(processor)
    assert (pp.height, pp.width, pp.resample, pp.resize_mode) == (224, 224, 3, "exact")
    photos = sorted(str(p) for p in SHARED_PHOTOS.glob("*.jpg"))
    gray = [p for p in photos if PIL.Image.open(p).mode == "L"]
    chosen = photos[::15] + gray
    synthetic = [noise(17, 300, 1), noise(1000, 20, 2), noise(224, 224, 3), smooth(225, 223, 4)]
    ref = _processor_pixels(processor, chosen + synthetic)
    ours = _ours(pp, chosen + synthetic)
    assert ours.shape == ref.shape == (len(chosen) + 4, 3, 224, 224)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "config, expect",
    [
        (
            {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 40},
             "crop_size": {"height": 32, "width": 32}, "do_center_crop": True},
            ("shortest_edge", (32, 32)),
        ),
        (
            {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 32}, "crop_pct": 0.875},
            ("shortest_edge", (32, 32)),
        ),
        (
            {"image_processor_type": "DeiTImageProcessor", "size": {"height": 40, "width": 44},
             "crop_size": {"height": 32, "width": 36}, "do_center_crop": True},
            ("exact", (32, 36)),
        ),
        ({"image_processor_type": "ViTImageProcessor", "size": 30}, ("exact", (30, 30))),
        (
            {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 36}, "crop_size": 33},
            ("shortest_edge", (33, 33)),
        ),
    ],
)
def test_processor_equivalence_other_size_conventions(tmp_path: Path, config: dict, expect) -> None:
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    pp = Preprocess.from_pretrained(str(tmp_path))
    assert pp == Preprocess.from_processor(processor)
    assert (pp.resize_mode, (pp.height, pp.width)) == expect
    imgs = [noise(50, 90, 1), smooth(120, 61, 2), noise(33, 33, 3), noise(20, 25, 4)]  # last one needs upscaling
    assert (_ours(pp, imgs) - _processor_pixels(processor, imgs)).abs().max().item() < 1e-5


def test_preprocess_dict_roundtrip_and_errors(tmp_path: Path) -> None:
    pp = Preprocess(32, 36, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 3, resize_mode="shortest_edge", shortest_edge=40)
    d = pp.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Preprocess.from_dict(d) == pp
    with pytest.raises(VitloraError, match="has no preprocessor_config.json"):
        Preprocess.from_pretrained(str(tmp_path))
    with pytest.raises(VitloraError, match="without a center crop"):
        Preprocess.from_dict(
            {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 40}, "do_center_crop": False}
        )


def test_resize_for_train_geometry() -> None:
    img = noise(90, 50)
    t = resize_for_train(img, VIT)
    assert t.dtype == torch.uint8 and t.shape == (3, 256, 256)
    expect = torch.from_numpy(np.array(img.resize((256, 256), PIL.Image.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(t, expect)  # exact: whole image squashed, nothing cropped
    assert resize_for_train(img, SMALL, work_size=40).shape == (3, 40, 40)
    se = Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, 2, resize_mode="shortest_edge")
    t = resize_for_train(img, se)
    assert t.shape == (3, 37, 37)  # round(32 * 256/224)
    short = torch.from_numpy(np.array(img.resize((66, 37), PIL.Image.BILINEAR))).permute(2, 0, 1)
    assert torch.equal(t, short[:, :, 14:51])


def test_normalize_values() -> None:
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    mean = torch.tensor(VIT.mean).view(1, 3, 1, 1)
    std = torch.tensor(VIT.std).view(1, 3, 1, 1)
    expect = (x.double() / 255 - mean.double()) / std.double()
    out = normalize(x, VIT)
    assert out.dtype == torch.float32 and (out.double() - expect).abs().max() < 1e-5
    assert normalize(x, VIT, dtype=torch.bfloat16).dtype == torch.bfloat16
    raw = Preprocess(5, 4, (0.5,) * 3, (0.5,) * 3, 2, do_normalize=False)
    assert torch.allclose(normalize(x, raw), x.float() / 255)
    xf = x.float()
    normalize(xf, VIT)
    assert torch.equal(xf, x.float())  # input untouched


def _resized(batch: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """Reference: plain bilinear resize of the whole image, then normalise."""
    r = F.interpolate(batch.double(), (pp.height, pp.width), mode="bilinear", align_corners=False)
    mean = torch.tensor(pp.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((r * pp.rescale_factor - mean) / std).float()


def test_rrc_shapes_and_determinism() -> None:
    x = torch.randint(0, 256, (6, 3, 37, 37), dtype=torch.uint8)
    a = random_resized_crop_flip(x, SMALL, generator=torch.Generator().manual_seed(0))
    b = random_resized_crop_flip(x, SMALL, generator=torch.Generator().manual_seed(0))
    c = random_resized_crop_flip(x, SMALL, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random_resized_crop_flip(x, SMALL, dtype=torch.float16).dtype == torch.float16


def test_rrc_full_crop_flip_equals_flipped_resize() -> None:
    x = torch.randint(0, 256, (3, 3, 37, 37), dtype=torch.uint8)
    ref = _resized(x, SMALL)
    flipped = random_resized_crop_flip(x, SMALL, scale=(1, 1), ratio=(1, 1), hflip=1.0)
    same = random_resized_crop_flip(x, SMALL, scale=(1, 1), ratio=(1, 1), hflip=0.0)
    assert (flipped - ref.flip(-1)).abs().max() < 1e-4
    assert (same - ref).abs().max() < 1e-4


def test_rrc_crops_the_sampled_box() -> None:
    x = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    pp = Preprocess(20, 20, (0.5,) * 3, (0.5,) * 3, 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = random_resized_crop_flip(x, pp, scale=(0.25, 0.25), ratio=(1, 1), hflip=0.0, generator=g1)
    top, left, h, w = _crop_boxes(8, 40, 40, (0.25, 0.25), (1, 1), g2, torch.device("cpu"))
    assert (h == 20).all() and (w == 20).all()
    for k in range(8):
        t, l = int(top[k]), int(left[k])
        crop = x[k : k + 1, :, t : t + 20, l : l + 20]
        assert (out[k] - _resized(crop, pp)[0]).abs().max() < 1e-4  # 20x20 box -> 20x20: the crop itself


def test_rrc_boxes_follow_torchvision_rules() -> None:
    g = torch.Generator().manual_seed(0)
    top, left, h, w = _crop_boxes(4000, 50, 60, (0.25, 1.0), (3 / 4, 4 / 3), g, torch.device("cpu"))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 50).all() and (left + w <= 60).all()
    frac = h * w / 3000
    assert frac.min() > 0.22 and frac.max() <= 1.0
    assert 0.5 < (top > 0).float().mean() and 0.5 < (left > 0).float().mean()  # positions are random
    # impossible ratio -> torchvision's fallback: largest center crop with the ratio clamped
    top, left, h, w = _crop_boxes(3, 50, 50, (0.9, 1.0), (10.0, 10.0), g, torch.device("cpu"))
    assert w.tolist() == [50] * 3 and h.tolist() == [5] * 3 and top.tolist() == [22] * 3 and left.tolist() == [0] * 3


# --------------------------------------------------------------------- cache


def _folder(tmp_path: Path, n: int = 7) -> list[Sample]:
    out = []
    for i in range(n):
        lab = "ab"[i % 2]
        out.append(Sample(str(write(tmp_path / lab / f"{i}.png", noise(20 + 3 * i, 30, i))), lab))
    return out


def test_cache_memory_and_memmap_identical(tmp_path: Path) -> None:
    samples = _folder(tmp_path / "imgs")
    l2i = {"a": 0, "b": 1}
    mem, r1 = build_cache(samples, l2i, SMALL, train=True, num_threads=3)
    disk_dir = tmp_path / "cache"
    disk, r2 = build_cache(samples, l2i, SMALL, train=True, disk_dir=str(disk_dir), memory_budget_bytes=1000)
    assert r1.count == r2.count == 0 and r1.total == 7
    assert isinstance(mem.images, torch.Tensor) and not mem.on_disk
    assert isinstance(disk.images, np.memmap) and disk.on_disk
    files = list(disk_dir.iterdir())
    assert len(files) == 1 and files[0].stat().st_size == 7 * 3 * 37 * 37
    assert mem.paths == disk.paths == [s.path for s in samples]
    assert mem.labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
    idx = torch.tensor([6, 0, 3, 3])
    (xm, ym), (xd, yd) = mem.batch(idx), disk.batch(idx)
    assert xm.dtype == xd.dtype == torch.uint8 and xm.shape == (4, 3, 37, 37)
    assert torch.equal(xm, xd) and torch.equal(ym, yd)
    assert torch.equal(xm[1], resize_for_train(load_rgb(samples[0].path), SMALL))
    del disk, xd
    gc.collect()
    assert list(disk_dir.iterdir()) == []  # the cache file goes with the cache

    ev, _ = build_cache(samples, None, SMALL, train=False, memory_budget_bytes=1000)
    assert ev.images.shape == (7, 3, 32, 32) and ev.labels.tolist() == [-1] * 7
    assert torch.equal(torch.from_numpy(ev.images[2]), resize_for_eval(load_rgb(samples[2].path), SMALL))


def test_cache_unknown_labels(tmp_path: Path) -> None:
    samples = _folder(tmp_path, 3) + [Sample("x.png", "zebra")]
    with pytest.raises(VitloraError, match="labels not known to the model: zebra"):
        build_cache(samples, {"a": 0, "b": 1}, SMALL, train=True)


def test_cache_from_hf_samples(hf_dirs: tuple[str, str]) -> None:
    ds = discover(f"hf:{hf_dirs[1]}/train")
    l2i = {lab: i for i, lab in enumerate(ds.labels)}
    cache, report = build_cache(ds.samples, l2i, SMALL, train=False)
    assert report.count == 0 and len(cache) == 6
    assert cache.labels.tolist() == [1, 0, 1, 0, 1, -1]
    assert cache.images[2, :, 0, 0].tolist() == [0, 0, 255]


def test_iterate_batches_single_rank() -> None:
    batches = list(iterate_batches(10, 4, shuffle=False, generator=None))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(iterate_batches(10, 4, False, None, drop_last=True))) == 2
    s1 = torch.cat(list(iterate_batches(10, 3, True, torch.Generator().manual_seed(3))))
    s2 = torch.cat(list(iterate_batches(10, 3, True, torch.Generator().manual_seed(3))))
    assert torch.equal(s1, s2) and sorted(s1.tolist()) == list(range(10)) and s1.tolist() != list(range(10))
    assert list(iterate_batches(0, 4, True, None)) == []


@pytest.mark.parametrize("n, world, bs", [(10, 3, 2), (7, 4, 3), (2, 4, 1), (12, 4, 5)])
def test_iterate_batches_ddp(n: int, world: int, bs: int) -> None:
    def run(rank: int, drop_last: bool = False) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(9)  # same seed on every rank -> one shared permutation
        return list(iterate_batches(n, bs, True, g, rank=rank, world_size=world, drop_last=drop_last))

    per_rank = [run(r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    assert len({sum(len(x) for x in b) for b in per_rank}) == 1  # and same number of samples
    seen = torch.cat([x for b in per_rank for x in b]).tolist()
    assert set(seen) == set(range(n)) and len(seen) == -(-n // world) * world
    dropped = [run(r, drop_last=True) for r in range(world)]
    assert len({len(b) for b in dropped}) == 1
    flat = [i for b in dropped for x in b for i in x.tolist()]
    assert len(flat) == len(set(flat))  # no duplicates when dropping
    assert all(len(x) == bs for b in dropped for x in b)


def test_stream_decoded_order_and_skips(tmp_path: Path) -> None:
    good = [str(write(tmp_path / f"g{i}.png", noise(10 + i, 12, i))) for i in range(5)]
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    paths = [good[0], str(bad), good[1], good[2], good[3], str(tmp_path / "missing.png"), good[4], str(bad)]
    items = list(stream_decoded(paths, SMALL, batch_size=2, num_threads=3, prefetch=1))
    assert [names for _, names, _ in items] == [good[0:2], good[2:4], [good[4]]]
    assert [r.total for _, _, r in items] == [3, 2, 3]
    assert [r.skipped for _, _, r in items] == [
        [(str(bad), "not an image")],
        [],
        [(str(tmp_path / "missing.png"), "file not found"), (str(bad), "not an image")],
    ]
    x, names, _ = items[0]
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32)
    assert torch.equal(x[1], resize_for_eval(load_rgb(good[1]), SMALL))
    assert sum(r.total for _, _, r in items) == len(paths) and sum(r.count for _, _, r in items) == 3
    tail = list(stream_decoded([good[0], str(bad)], SMALL, batch_size=1))
    assert [(len(x), n, r.count) for x, n, r in tail] == [(1, [good[0]], 0), (0, [], 1)]


def test_public_api_types() -> None:
    ds = DataSource([Sample("a.png", "x")], "flat", ".", ["x"])
    assert ds.ignored_files == 0
    with pytest.raises(Exception):
        Sample("a", "b").label = "c"  # frozen
    assert ImageCache(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"]).batch(
        torch.tensor([1])
    )[1].tolist() == [1]


@pytest.mark.parametrize("on_disk", [False, True])
def test_per_label_sample_is_bounded_seeded_and_keeps_pixels(tmp_path: Path, on_disk: bool) -> None:
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 6)
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    if on_disk:  # large caches live in a memmap
        mm = np.lib.format.open_memmap(tmp_path / "c.npy", mode="w+", dtype=np.uint8, shape=tuple(images.shape))
        mm[:] = images.numpy()
        images = mm
    cache = ImageCache(images, labels, [f"p{i}" for i in range(len(labels))])
    a, b = cache.per_label_sample(4, seed=0), cache.per_label_sample(4, seed=0)
    assert torch.bincount(a.labels).tolist() == [4, 3, 4]  # a label with fewer keeps all of them
    assert a.paths == b.paths and a.paths != cache.per_label_sample(4, seed=1).paths
    rows = [int(p[1:]) for p in a.paths]
    assert a.labels.tolist() == labels[rows].tolist()
    assert torch.as_tensor(a.images)[:, 0, 0, 0].tolist() == rows  # each image travels with its label and path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rrc_and_normalize_on_cuda() -> None:
    x = torch.randint(0, 256, (5, 3, 37, 37), dtype=torch.uint8)
    cpu = random_resized_crop_flip(x, SMALL, generator=torch.Generator().manual_seed(4))
    gpu = random_resized_crop_flip(x.cuda(), SMALL, generator=torch.Generator().manual_seed(4))
    assert gpu.device.type == "cuda" and (gpu.cpu() - cpu).abs().max() < 1e-4
    cg = torch.Generator(device="cuda").manual_seed(4)
    a = random_resized_crop_flip(x.cuda(), SMALL, generator=cg, dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.shape == (5, 3, 32, 32)
    assert (normalize(x.cuda(), VIT).cpu() - normalize(x, VIT)).abs().max() < 1e-5
    idx = list(iterate_batches(10, 4, True, torch.Generator(device="cuda").manual_seed(0)))
    assert sorted(torch.cat(idx).tolist()) == list(range(10))
