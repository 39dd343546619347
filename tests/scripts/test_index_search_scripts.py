"""scripts/index.py and scripts/search.py end to end on a tiny embedding export."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import index  # noqa: E402
import search  # noqa: E402

from xbm_tf import data  # noqa: E402
from xbm_tf.backbones import build_embedding_model  # noqa: E402
from xbm_tf.export import export_embedding_model, load_exported_embedder  # noqa: E402
from xbm_tf.plots import grid_layout  # noqa: E402
from xbm_tf.retrieval import load_retrieval_model, nearest_neighbors  # noqa: E402

FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def embedding_export(tmp_path_factory):
    model = build_embedding_model("tiny", 16, input_shape=(28, 28, 1))
    return export_embedding_model(model, tmp_path_factory.mktemp("run") / "export")


def _write_pngs(images, folder):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"img_{i:02d}.png")
        tf.io.write_file(path, tf.io.encode_png(image))
        paths.append(path)
    return paths


def _test_images(indices):
    test = data.load_quickstart(max_per_class=12).test
    return test.images[np.asarray(indices)]


def test_index_split_then_search(
    parse, tmp_path, embedding_export, capsys, monkeypatch
):
    out = tmp_path / "retrieval"
    parse(
        f"--model={embedding_export}", "--split=test", f"--output={out}", "--search_k=5"
    )
    index.run()
    source = json.loads((out / "index.json").read_text())
    assert (source["split"], source["num_items"], source["crop_size"]) == (
        "test",
        120,
        28,
    )
    lines = (out / "projector" / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "id\tlabel" and len(lines) == 121
    assert lines[1].split("\t")[0] == "0"
    assert "sprite.png" in (out / "projector" / "projector_config.pbtxt").read_text()
    assert (out / "projector" / "sprite.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Browse it: tensorboard --logdir" in printed
    assert "120/120" in printed and "Unknown" not in printed  # the bar's total

    # The export returns the exact search over the embedded test split.
    ds = data.eval_dataset(
        data.load_quickstart(max_per_class=12).test,
        batch_size=64,
        resize_size=32,
        crop_size=28,
        channels=1,
    )
    images = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
    gallery = load_exported_embedder(embedding_export)(images)
    retrieval = load_retrieval_model(out)
    got = retrieval(images[[0, 50, 119]])
    rows, _ = nearest_neighbors(got["embeddings"], gallery, k=5, backend="exact")
    np.testing.assert_array_equal(got["ids"], rows)

    # search.py with three test images saved as files: same results, a grid.
    queries = _write_pngs(_test_images([0, 50, 119]), tmp_path / "queries")
    parse(f"--retrieval={out}", f"--grid={tmp_path / 'grid.png'}", "--show=4")
    result = search.run(queries)
    np.testing.assert_array_equal(result["ids"], rows)
    printed = capsys.readouterr().out
    assert queries[1] in printed
    # Each result with its class name (the unseen classes: digits 5-9, animals).
    labels = data.load_quickstart(max_per_class=12).test.labels
    name = data.QUICKSTART_CLASS_NAMES[labels[rows[1, 0]]]
    unseen = [f"digit {d}" for d in range(5, 10)]
    assert name in unseen + ["elephant", "giraffe", "horse", "sheep", "zebra"]
    assert f"    1  {result['scores'][1, 0]:8.4f}  {rows[1, 0]}  {name}\n" in printed
    height, width, _, tile_w, origin = grid_layout((28, 28), 3, 4, 3, 4, 4)
    png = tf.io.decode_png(tf.io.read_file(str(tmp_path / "grid.png"))).numpy()
    assert tuple(png.shape[:2]) == (height, width)
    # The names are drawn at the foot of each result: the grid differs from one
    # drawn without them there, and only there.
    named = search.class_names
    monkeypatch.setattr(search, "class_names", lambda *a: None)
    parse(f"--retrieval={out}", f"--grid={tmp_path / 'plain.png'}", "--show=4")
    search.run(queries)
    plain = tf.io.decode_png(tf.io.read_file(str(tmp_path / "plain.png"))).numpy()
    changed = np.any(png != plain, axis=-1)
    for row in range(3):
        for col in range(1, 5):
            y, x = origin(row, col)
            foot = changed[y + 84 + 8 - 17 : y + 84 + 8, x : x + tile_w]
            assert foot.any(), (row, col)
            changed[y + 84 + 8 - 17 : y + 84 + 8, x : x + tile_w] = False
    assert not changed.any()
    monkeypatch.setattr(search, "class_names", named)

    # Never replaced without --overwrite, checked before any embedding.
    parse(f"--model={embedding_export}", "--split=test", f"--output={out}")
    with pytest.raises(index.FlagError, match="already exists.*--overwrite"):
        index.run()
    # A search is a query: asked again, it replaces its own grid...
    before = (tmp_path / "grid.png").stat().st_mtime_ns
    parse(f"--retrieval={out}", f"--grid={tmp_path / 'grid.png'}", "--show=2")
    again = search.run(queries[:1])
    np.testing.assert_array_equal(again["ids"], rows[:1])
    assert (tmp_path / "grid.png").stat().st_mtime_ns > before
    height, width, *_ = grid_layout((28, 28), 1, 2, 3, 4, 4)
    png = tf.io.decode_png(tf.io.read_file(str(tmp_path / "grid.png")))
    assert tuple(png.shape[:2]) == (height, width)
    # ... but a file it did not write only with --overwrite.
    (tmp_path / "mine.png").write_bytes(b"a user's file")
    parse(f"--retrieval={out}", f"--grid={tmp_path / 'mine.png'}")
    with pytest.raises(search.FlagError, match="mine.png exists and is not a grid"):
        search.run(queries)
    assert (tmp_path / "mine.png").read_bytes() == b"a user's file"
    parse(f"--retrieval={out}", f"--grid={tmp_path / 'mine.png'}", "--overwrite")
    search.run(queries)
    assert search.written_by_search(str(tmp_path / "mine.png"))
    # Without --grid, the grid goes inside --retrieval: a rerun replaces it.
    parse(f"--retrieval={out}")
    for _ in range(2):
        search.run(queries)
        assert search.written_by_search(str(out / "search_results.png"))


def test_index_images_folder_ids_are_paths(
    parse, tmp_path, embedding_export, capsys, monkeypatch, float32_gap
):
    paths = _write_pngs(_test_images(range(0, 120, 6)), tmp_path / "photos" / "a")
    out = tmp_path / "retrieval"
    parse(
        f"--model={embedding_export}",
        "--images=photos",
        f"--output={out}",
        "--search_k=3",
        "--nosprite",
    )
    root = os.getcwd()
    monkeypatch.chdir(tmp_path)  # --images relative: the ids are still absolute
    index.run()
    assert not (out / "projector" / "sprite.png").exists()
    metadata = (out / "projector" / "metadata.tsv").read_text().splitlines()
    assert metadata == paths  # one column: no header
    monkeypatch.chdir(root)
    parse(f"--retrieval={out}")
    monkeypatch.chdir(tmp_path / "photos")  # search from another folder
    result = search.run(paths[4:6])
    assert result["ids"][:, 0].tolist() == paths[4:6]  # each image finds itself
    # An image against its own gallery row, embedded in batches of other sizes:
    # s = (|e|^2 + |e'|^2 - |e - e'|^2) / 2. Each squared norm is within 16 + 8
    # roundings of 1 (the 16-wide sum, a few ulps of rsqrt and the product), s
    # is rounded once more (2**-23 at 1), and each of the 16 entries of e - e'
    # is within the tiny network's float32_gap (about 1030 sums).
    gap = 24 * 2.0**-24 + 2.0**-23 + 16 * float32_gap(1030) ** 2 / 2
    np.testing.assert_allclose(result["scores"][:, 0], 1.0, rtol=0, atol=gap)
    assert search.written_by_search(str(out / "search_results.png"))  # inside


def test_free_slots_of_an_approximate_index_show_blank(tmp_path):
    paths = _write_pngs(_test_images([0, 1]), tmp_path / "p")
    source = {"resize_size": 28, "crop_size": 28, "channels": 1}
    ids = np.array([[paths[1], ""], [paths[0], paths[1]]], dtype=object)
    images, at = search.result_images(ids, source)
    assert at.tolist() == [[1, 2], [0, 1]]  # unique sorted paths, then the blank
    assert images.shape == (3, 28, 28, 1)
    assert images[0].any() and images[1].any() and not images[2].any()
    assert search.result_images(np.full((1, 2), -1), {"split": "test"}) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--split=gallery"], "--split=gallery is not a split of --dataset=quickstart"),
        (["--split=test", "--images=/tmp"], "exactly one of --split and --images"),
        (["--images=/nonexistent"], "--images=/nonexistent is not a folder"),
        (["--split=test", "--search_k=121"], "--search_k=121 is larger than the"),
        (
            [
                "--split=test",
                "--index=tree_ah",
                "--num_leaves=2",
                "--leaves_to_search=3",
            ],
            "leaves_to_search=3 exceeds num_leaves=2",
        ),
    ],
)
def test_index_bad_flags_fail_before_embedding(
    parse, tmp_path, embedding_export, monkeypatch, args, message
):
    def no_embedding(*a, **k):
        raise AssertionError("embedded before checking the flags")

    monkeypatch.setattr(index, "embed_gallery", no_embedding)
    parse(f"--model={embedding_export}", f"--output={tmp_path / 'r'}", *args)
    with pytest.raises(index.FlagError, match=message):
        index.run()
    assert not (tmp_path / "r").exists()


def test_search_bad_flags(parse, tmp_path):
    parse(f"--retrieval={tmp_path}")
    with pytest.raises(search.FlagError, match="is not a SavedModel folder"):
        search.run(["q.png"])
    (tmp_path / "saved_model.pb").write_bytes(b"")
    with pytest.raises(search.FlagError, match="not found: /no/such.png"):
        search.run(["/no/such.png"])


@pytest.mark.parametrize("script", [index, search])
def test_help_lists_overwrite(script):
    # `--help` shows a script's key flags; --overwrite is one of both.
    assert "--[no]overwrite" in FLAGS.module_help(script)
