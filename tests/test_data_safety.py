"""Data-folder faults from issue 10: FIFOs, symlink loops, a class emptied by bad images,
non-UTF-8 manifests and names, an unreachable hub. Each gives one line or a counted skip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import PIL.Image
import pytest

from vitlora.cli import main
from vitlora.data import Preprocess, build_cache, discover, expand_image_paths, stream_decoded
from vitlora.errors import VitloraError

SMALL = Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resample=2)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def write(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (40, 36), colour).save(path)
    return path


def two_classes(root: Path, n: int = 2) -> Path:
    for i in range(n):
        write(root / "cat" / f"c{i}.png")
        write(root / "dog" / f"d{i}.png", (20, 30, 200))
    return root


# ------------------------------------------------------------------------------- FIFO


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_like_an_image_never_blocks(tmp_path: Path) -> None:
    """Train-side discovery, the cache, predict's path expansion and decoding all pass a FIFO by.

    Run in a child with a timeout: a regression (opening the FIFO) hangs there, not here.
    """
    root = two_classes(tmp_path / "data")
    os.mkfifo(root / "cat" / "x.jpg")
    os.mkfifo(root / "y.jpg")  # top level too: still an ImageFolder, not a "mixed" layout
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from vitlora.data import Preprocess, Sample, build_cache, discover, expand_image_paths, stream_decoded
        pp = Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, resample=2)
        root = {str(root)!r}
        ds = discover(root)
        print("classes", ds.labels, len(ds.samples), ds.ignored_files)
        print("expand", len(expand_image_paths([root])))
        fifo = root + "/cat/x.jpg"
        cache, rep = build_cache([Sample(fifo, "cat"), *ds.samples], {{"cat": 0, "dog": 1}}, pp, train=False)
        print("cache", len(cache), rep.skipped)
        paths = expand_image_paths([fifo, root + "/cat/c0.png"])
        got = [(len(x), r.skipped) for x, _, r in stream_decoded(paths, pp, batch_size=4)]
        print("predict", got)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "classes ['cat', 'dog'] 4 2"  # the FIFOs are counted as ignored, not images
    assert lines[1] == "expand 4"
    assert lines[2] == f"cache 4 [('{root}/cat/x.jpg', 'not a regular file')]"
    assert lines[3] == f"predict [(1, [('{root}/cat/x.jpg', 'not a regular file')])]"


# ------------------------------------------------------------------- class emptied by skips


def test_class_whose_only_image_is_corrupt_is_an_error(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "data")
    (root / "fox").mkdir()
    (root / "fox" / "only.jpg").write_bytes(b"not a jpeg at all")
    ds = discover(str(root))
    assert ds.labels == ["cat", "dog", "fox"]
    label2id = {lab: i for i, lab in enumerate(ds.labels)}
    with pytest.raises(VitloraError) as e:
        build_cache(ds.samples, label2id, SMALL, train=True)
    msg = str(e.value)
    assert msg.startswith("class fox has no readable training images (skipped 1 of 5 images: ")
    assert "only.jpg (not an image)" in msg and "\n" not in msg
    # evaluation data may lack a class: skipped and reported, not an error
    cache, report = build_cache(ds.samples, label2id, SMALL, train=False)
    assert len(cache) == 4 and report.count == 1


def test_class_emptied_by_skips_through_the_cli(capsys, tiny_model, tmp_path: Path) -> None:
    root = two_classes(tmp_path / "data", n=4)
    (root / "fox").mkdir()
    (root / "fox" / "only.jpg").write_bytes(b"\xff\xd8\xff truncated")
    code = main(["train", str(root), "--model", str(tiny_model), "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "class fox has no readable training images" in err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- symlinks


def _symlink(link: Path, target: Path) -> None:
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        pytest.skip("cannot create symlinks here")


@pytest.mark.parametrize("where, target, why", [
    ("cat/more", "dog", "outside its own folder"),        # another class's images would join cat
    ("cat/up", ".", "contains the data folder"),           # loop through the data folder
    ("cat/sub/top", "..", "contains the data folder"),     # loop above the data folder
    ("kitten", "cat", "outside its own folder"),           # a class folder that is another class
])
def test_symlinked_folder_that_loops_or_joins_another_class(tmp_path: Path, where: str, target: str,
                                                            why: str) -> None:
    root = two_classes(tmp_path / "data")
    (root / "cat" / "sub").mkdir()
    _symlink(root / where, (root / target).resolve())
    with pytest.raises(VitloraError, match=f"{where} is a symlink to .*{why}"):
        discover(str(root))


def test_symlinks_that_are_fine(tmp_path: Path) -> None:
    """Symlinked files, folders inside the class folder and folders outside the data folder."""
    root = two_classes(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "e0.png")
    _symlink(root / "cat" / "extra", elsewhere)                    # outside the data folder: followed
    _symlink(root / "dog" / "again", root / "dog")                  # inside its own class: listed once
    (root / "cat" / "linked.png").symlink_to(elsewhere / "e0.png")  # a symlinked file
    _symlink(elsewhere / "back", elsewhere)                         # a loop outside: visited once
    ds = discover(str(root))
    got = sorted(os.path.relpath(s.path, root) + ":" + str(s.label) for s in ds.samples)
    assert got == ["cat/c0.png:cat", "cat/c1.png:cat", "cat/extra/e0.png:cat", "cat/linked.png:cat",
                   "dog/d0.png:dog", "dog/d1.png:dog"]
    # predict: a folder with a loop to its parent is refused, not walked forever or into siblings
    _symlink(elsewhere / "parent", tmp_path)
    with pytest.raises(VitloraError, match="contains the data folder"):
        expand_image_paths([str(elsewhere)])


# ------------------------------------------------------------------------------ non-UTF-8


@pytest.mark.parametrize("name, body, line, byte", [
    ("m.csv", b"path,label\ncat/c0.png,cat\ncat/c1.png,caf\xe9\n", 3, 0xE9),
    ("m.jsonl", b'{"path": "cat/c0.png", "label": "cat"}\n\n{"path": "x\xff.png", "label": "dog"}\n', 3, 0xFF),
])
def test_non_utf8_manifest_names_file_and_line(tmp_path: Path, name: str, body: bytes, line: int, byte: int) -> None:
    two_classes(tmp_path)
    (tmp_path / name).write_bytes(body)
    with pytest.raises(VitloraError) as e:
        discover(str(tmp_path / name))
    assert str(e.value) == f"{tmp_path / name} line {line}: not UTF-8 text (byte 0x{byte:02x}); save the manifest as UTF-8"


def test_jsonl_label_with_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "label": "x\\udcff"}\n', encoding="utf-8")
    with pytest.raises(VitloraError, match="is not valid UTF-8 text"):
        discover(str(tmp_path / "m.jsonl"))


@pytest.mark.skipif(sys.platform != "linux", reason="needs byte file names")
def test_non_utf8_file_and_class_names(tmp_path: Path) -> None:
    root = tmp_path / "data"
    two_classes(root)
    bad_file = os.fsdecode(b"caf\xe9.png")  # surrogate-escaped by Python
    write(root / "cat" / bad_file)
    ds = discover(str(root))  # a file name is just a path: fine
    assert len(ds.samples) == 5
    cache, report = build_cache(ds.samples, {"cat": 0, "dog": 1}, SMALL, train=True)
    assert len(cache) == 5 and report.count == 0
    paths = expand_image_paths([str(root)])
    assert any(p.endswith(bad_file) for p in paths)
    os.remove(root / "cat" / bad_file)
    (root / "cat" / bad_file).write_bytes(b"junk")  # a skip report naming it prints as UTF-8
    _, _, rep = next(iter(stream_decoded([str(root / "cat" / bad_file)], SMALL, batch_size=1)))
    assert rep.summary().encode("utf-8").endswith(b"caf\\xe9.png (not an image)")

    write(root / os.fsdecode(b"\xffclass") / "a.png")  # a class name becomes a label: must be text
    with pytest.raises(VitloraError) as e:
        discover(str(root))
    assert "class name '\\\\xffclass'" in str(e.value) and "not valid UTF-8 text" in str(e.value)
    str(e.value).encode("utf-8")  # printable


# ------------------------------------------------------------------------------- offline hub


def test_unreachable_hub_fails_before_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE, one short probe decides; datasets' retries never start."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    import vitlora.data.hf as hf

    probes = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "hub_reachable", lambda: probes.append(1) or False)

    def never(*a, **k):
        raise AssertionError("load_dataset must not be called when the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", never)
    with pytest.raises(VitloraError) as e:
        discover("hf:user/beans/train")
    assert probes == [1]
    msg = str(e.value)
    assert "hub is unreachable" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
