"""WebDataset shards (issue 14, goal 2): discovery, the key-hash split, ranks, workers, shuffling,
the same pixels as a folder, and memory that stays bounded however many samples stream by."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

wds = pytest.importorskip("webdataset")

from vitlora.data import Preprocess, SkipReport, build_cache, discover  # noqa: E402
from vitlora.errors import VitloraError  # noqa: E402

SMALL = Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resample=2)
LABELS = ["cat", "dog", "fox"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _png(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tagged(i: int) -> bytes:
    """A solid image whose colour is its index: any resize keeps it, so a batch tells which samples it holds."""
    return _png(PIL.Image.new("RGB", (40, 36), (i % 256, i // 256, 77)))


def _index_of(batch: torch.Tensor) -> list[int]:
    return [int(x[0, 0, 0]) + 256 * int(x[1, 0, 0]) for x in batch]


def make_shards(out: Path, n: int, per_shard: int, image=_tagged, labels=LABELS) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "train-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"s{i:05d}", "png": image(i), "cls": labels[i % len(labels)].encode()})
    k = -(-n // per_shard)
    return str(out / f"train-{{0000..{k - 1:04d}}}.tar")


def _epoch(shards, vf: float = 0.0, **kw) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for x, y in shards.train_batches({lab: i for i, lab in enumerate(LABELS)}, SMALL, kw.pop("batch_size", 4), vf,
                                     seed=kw.pop("seed", 0), epoch=kw.pop("epoch", 0), **kw):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, SMALL.work_size(), SMALL.work_size())
        ids += _index_of(x)
        labels += y.tolist()
    return ids, labels


def test_discover_labels_counts_and_errors(tmp_path: Path) -> None:
    spec = make_shards(tmp_path / "s", 30, per_shard=8)  # 4 shards: 8, 8, 8, 6
    ds = discover(spec)
    assert ds.kind == "webdataset" and ds.samples == [] and ds.labels == LABELS
    assert len(ds.shards.shards) == 4 and ds.shards.count("all", 0.2) == 30
    assert ds.shards.count("train", 0.2) + ds.shards.count("val", 0.2) == 30
    assert 0 < ds.shards.count("val", 0.2) < 30

    (tmp_path / "s" / "labels.txt").write_text("fox\ncat\ndog\n")  # its order is the label order
    assert discover(spec).labels == ["fox", "cat", "dog"]
    (tmp_path / "s" / "labels.txt").write_text("fox\ncat\n")
    with pytest.raises(VitloraError, match="has labels missing from labels.txt: dog"):
        discover(spec)
    with pytest.raises(VitloraError, match=r"shard not found: .*train-0004.tar \(2 of 6 shards missing\)"):
        discover(str(tmp_path / "s" / "train-{0000..0005}.tar"))
    with pytest.raises(VitloraError, match="--label is for a flat folder"):
        discover(spec, label="x")
    (tmp_path / "bad.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(VitloraError, match="cannot read shard .*bad.tar"):
        discover(str(tmp_path / "bad.tar"))


def test_every_sample_once_per_epoch_and_shuffled(tmp_path: Path) -> None:
    shards = discover(make_shards(tmp_path / "s", 30, per_shard=8)).shards
    ids, labels = _epoch(shards, batch_size=4, shuffle_buffer=10)
    assert sorted(ids) == list(range(30))
    assert labels == [i % 3 for i in ids]  # each image carries its own label id
    assert shards.batches_per_epoch(4, 0.0) == 8
    again, _ = _epoch(shards, batch_size=4, shuffle_buffer=10)
    other, _ = _epoch(shards, batch_size=4, shuffle_buffer=10, epoch=1)
    assert again == ids  # same seed and epoch: same order
    assert other != ids and sorted(other) == sorted(ids)  # next epoch: another order, same samples
    assert ids != sorted(ids)  # shuffled at all


def test_key_hash_split_is_disjoint_and_fixed(tmp_path: Path) -> None:
    shards = discover(make_shards(tmp_path / "s", 60, per_shard=16)).shards
    train, _ = _epoch(shards, vf=0.25)
    val_cache, report = shards.decode_split("val", {lab: i for i, lab in enumerate(LABELS)}, SMALL, 0.25)
    val = _index_of(val_cache.images)
    assert report.count == 0 and len(val) == shards.count("val", 0.25) and len(train) == shards.count("train", 0.25)
    assert not set(train) & set(val) and sorted(train + val) == list(range(60))
    assert val_cache.labels.tolist() == [i % 3 for i in val]
    assert val_cache.paths[0].startswith("train-000") and ":s" in val_cache.paths[0]
    train2, _ = _epoch(shards, vf=0.25, seed=5)  # another seed reshuffles; the split stays
    assert sorted(train2) == sorted(train)


@pytest.mark.parametrize("n, per_shard, world", [(32, 8, 2), (36, 8, 2), (30, 4, 3)])
def test_ranks_read_disjoint_shards_in_equal_batch_counts(tmp_path: Path, n: int, per_shard: int,
                                                          world: int) -> None:
    shards = discover(make_shards(tmp_path / "s", n, per_shard=per_shard)).shards
    per_rank = [_epoch(shards, rank=r, world_size=world, batch_size=3)[0] for r in range(world)]
    firsts = [set(ids[: shards.count("train", 0.0, shards.rank_shards(r, world))]) for r, ids in enumerate(per_rank)]
    for a in range(world):
        for b in range(a + 1, world):
            assert not firsts[a] & firsts[b]  # a rank's own pass: only its shards
    assert set().union(*firsts) == set(range(n))
    want = shards.samples_per_rank(0.0, world)
    assert [len(ids) for ids in per_rank] == [want] * world  # smaller ranks wrap around
    with pytest.raises(VitloraError, match="cannot be shared by"):
        shards.rank_shards(0, len(shards.shards) + 1)


def test_loader_workers_split_shards(tmp_path: Path) -> None:
    shards = discover(make_shards(tmp_path / "s", 24, per_shard=6)).shards
    ids, labels = _epoch(shards, num_workers=2, batch_size=5)
    assert sorted(ids) == list(range(24)) and labels == [i % 3 for i in ids]


def test_same_pixels_as_a_folder_and_bad_images_skipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (36 + i, 40, 3), dtype=np.uint8) for i in range(9)]

    def noisy(i: int) -> bytes:
        return b"broken" if i == 4 else _png(PIL.Image.fromarray(arrays[i]))

    shards = discover(make_shards(tmp_path / "s", 9, per_shard=4, image=noisy)).shards
    folder = tmp_path / "f"
    for i, a in enumerate(arrays):
        (folder / LABELS[i % 3]).mkdir(parents=True, exist_ok=True)
        (folder / LABELS[i % 3] / f"s{i:05d}.png").write_bytes(noisy(i))
    label2id = {lab: i for i, lab in enumerate(LABELS)}
    ours, report = shards.decode_split("all", label2id, SMALL, 0.0, draft=False)
    ref, ref_report = build_cache(discover(str(folder)).samples, label2id, SMALL, train=False, draft=False)
    assert report.count == ref_report.count == 1 and report.skipped[0] == ("train-0001.tar:s00004", "not an image")
    by_key = {p.rsplit(":", 1)[1]: k for k, p in enumerate(ours.paths)}
    for k, p in enumerate(ref.paths):
        assert torch.equal(ours.images[by_key[Path(p).stem]], ref.images[k])
    train_ref, _ = build_cache(discover(str(folder)).samples, label2id, SMALL, train=True)  # training pixels too
    streamed = [x for x, _ in shards.train_batches(label2id, SMALL, 3, 0.0, 0, 0, shuffle_buffer=0)]
    streamed = torch.cat(streamed)  # file order: the 8 readable ones, then the first again (the 9th place)
    assert len(streamed) == 9 and torch.equal(streamed[8], streamed[0])
    assert sorted(x.numpy().tobytes() for x in streamed[:8]) == sorted(x.numpy().tobytes() for x in train_ref.images)
    skips = SkipReport()
    ids = [y for _, ys in shards.train_batches(label2id, SMALL, 2, 0.0, 0, 0, report=skips) for y in ys.tolist()]
    # the epoch keeps its length (9, as indexed): the unreadable image's place goes to the next pass
    assert len(ids) == 9 and skips.count >= 1 and skips.skipped[0][1] == "not an image"


def test_bounded_training_sample_per_label(tmp_path: Path) -> None:
    """A few training images of each label (to imprint new head rows), not the whole data set."""
    shards = discover(make_shards(tmp_path / "s", 60, per_shard=10)).shards
    label2id = {lab: i for i, lab in enumerate(LABELS)}
    cache, _ = shards.decode_split("train", label2id, SMALL, 0.25, train=True, per_label=4)
    assert cache.images.shape == (12, 3, SMALL.work_size(), SMALL.work_size())
    assert sorted(cache.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    ids = _index_of(cache.images)
    assert [i % 3 for i in ids] == cache.labels.tolist()
    val, _ = shards.decode_split("val", label2id, SMALL, 0.25)
    assert not set(ids) & set(_index_of(val.images))
    assert list(shards.label_counts("all", 0.0)) == [20, 20, 20]


def test_a_class_only_in_validation_is_an_error(tmp_path: Path) -> None:
    shards = discover(make_shards(tmp_path / "s", 12, per_shard=6)).shards
    with pytest.raises(VitloraError, match="no training samples of cat, dog, fox"):
        next(shards.train_batches({lab: i for i, lab in enumerate(LABELS)}, SMALL, 2, 1.0 - 1e-12, 0, 0))


def test_memory_stays_bounded_while_streaming(tmp_path: Path) -> None:
    """Stream 2 epochs of 640 images (250 MB of decoded pixels); the child's peak RSS grows far less.

    Noise images (incompressible) of 256x256: each decodes to 196 KB, 125 MB an epoch. The
    budget (50 MB) is well under one epoch's decoded size, so holding the epoch would break it.
    """
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)

    def big(i: int) -> bytes:
        buf = io.BytesIO()
        PIL.Image.fromarray(np.roll(noise, i, axis=1)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    n = 640
    spec = make_shards(tmp_path / "big", n, per_shard=40, image=big)
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {SRC!r})
        from vitlora.data import Preprocess, discover
        pp = Preprocess(224, 224, (0.5,) * 3, (0.5,) * 3, resample=2)
        shards = discover({spec!r}).shards
        l2i = {{lab: i for i, lab in enumerate(shards.labels)}}
        def run(epoch):
            return sum(len(y) for _, y in shards.train_batches(l2i, pp, 16, 0.0, 0, epoch, shuffle_buffer=64,
                                                                work_size=256))
        warm = shards.train_batches(l2i, pp, 16, 0.0, 0, 0, shuffle_buffer=64, work_size=256)
        next(warm), next(warm)  # two batches: imports, thread pool, allocator arenas
        warm.close()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seen = sum(run(e) for e in (1, 2))
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(seen, grew)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    seen, grew_kb = map(int, out.stdout.split())
    decoded_mb = seen * 3 * 256 * 256 / 2**20
    assert seen == 2 * n and decoded_mb >= 240
    assert grew_kb < 50 * 1024, f"peak RSS grew {grew_kb / 1024:.0f} MB while streaming {decoded_mb:.0f} MB"


def test_stream_feeds_the_loops_index_batches_one_pass_per_epoch(tmp_path: Path) -> None:
    """ShardStream: what the training loop sees (len, batch(idx)) covers each training sample once per epoch."""
    from vitlora.data import iterate_batches
    from vitlora.data.webdataset import ShardStream

    spec = make_shards(tmp_path / "s", 30, per_shard=8)
    shards = discover(spec).shards
    stream = ShardStream(shards, {lab: i for i, lab in enumerate(LABELS)}, SMALL, 0.2, seed=0, rank=0,
                         world_size=1, num_threads=1, report=SkipReport(), chunk=5)
    n_train = shards.count("train", 0.2)
    assert len(stream) == n_train
    gen = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(2):
        seen, labels = [], []
        for idx in iterate_batches(len(stream), 4, shuffle=True, generator=gen):
            for part in idx.split(3):  # micro-batches, as the loop asks for them
                images, y = stream.batch(part)
                assert len(images) == len(part) == len(y)
                seen += _index_of(images)
                labels += y.tolist()
        assert sorted(seen) == sorted(set(seen)) and len(seen) == n_train  # each training sample once
        assert all(LABELS[lab] == LABELS[i % 3] for i, lab in zip(seen, labels))
        epochs.append(seen)
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]  # same samples, reshuffled
    assert stream.label_counts(0.2).sum() == n_train


def test_train_and_eval_on_shards_match_the_same_images_as_a_folder(tmp_path: Path, tiny_model: Path) -> None:
    """`vitlora train shards/train-{...}.tar` streams; accuracy equals the same photos as a folder (± 0.02)."""
    import json

    from conftest import COLOURS, make_colour_images
    from vitlora.cli import main

    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    with wds.ShardWriter(str(tmp_path / "shards-%04d.tar"), maxcount=12, verbose=0) as sink:
        for j, colour in enumerate(COLOURS):
            for i, path in enumerate(make_colour_images(train_dir / colour, colour, 12, seed=j)):
                sink.write({"__key__": f"{colour}{i:03d}", path.suffix[1:]: path.read_bytes(), "cls": colour.encode()})
            make_colour_images(val_dir / colour, colour, 4, seed=10 + j)
    spec = str(tmp_path / "shards-{0000..0002}.tar")
    common = ["--model", str(tiny_model), "--val", str(val_dir), "--epochs", "3", "--batch-size", "8",
              "--precision", "fp32", "--quiet", "--seed", "1"]
    assert main(["train", spec, "--out", str(tmp_path / "from-shards"), *common]) == 0
    assert main(["train", str(train_dir), "--out", str(tmp_path / "from-folder"), *common]) == 0
    best = {}
    for name in ("from-shards", "from-folder"):
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        best[name] = max(e["val_accuracy"] for e in m["epochs"])
    assert best["from-shards"] >= 0.9 and abs(best["from-shards"] - best["from-folder"]) <= 0.02
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "from-shards"), spec, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 36
    assert main(["train", spec, "--mode", "extend", "--out", str(tmp_path / "x"), *common]) == 2  # one line
