"""Tests for xbm_tf.retrieval.serving: the retrieval SavedModel with ScaNN inside."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from xbm_tf.backbones import build_embedding_model
from xbm_tf.retrieval import (
    embed_gallery,
    export_retrieval_model,
    load_retrieval_model,
    nearest_neighbors,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (12, 12, 1)
DIM = 16
# The tiny network's sums, on one grey image: 3x3 convolutions over 1, 32 and
# 64 channels (9, 288 and 576 terms), the rescaling and three batch norms (a
# few roundings each), the 128-wide Dense and the L2 norm: about 1030 terms. An
# export and `predict` (XLA, other batch sizes) run other kernels, so they are
# within conftest's float32_gap(TINY_SUMS) = 1.2e-4 of each other.
TINY_SUMS = 1030
# Scores of unit vectors: the exact search's float32 dot products are within
# DIM roundings of the exact value, the SavedModel's float64 ones rounded to
# float32 within one, and a float32 step at |s| <= 1 is at most 2**-23.
SCORE_GAP = (DIM + 2) * 2.0**-24


@pytest.fixture(scope="module")
def model():
    return build_embedding_model("tiny", DIM, input_shape=SHAPE)


def _tied_gallery(seed=0):
    """Embeddings on a 1/8 grid (every dot product is exact in float32) with
    duplicated rows at scattered places, and one group of 40 equal rows (more
    than k + 16, so ScaNN's candidates cannot hold the whole tie)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(150, DIM)) / 8.0
    rows = np.concatenate([base, base[:60], base[:30], np.repeat(base[:1] * 2, 40, 0)])
    rows = rows[rng.permutation(len(rows))].astype(np.float32)
    other = rng.integers(-2, 3, (9, DIM)) / 8
    queries = np.concatenate([base[:40], base[:1] * 2, other])
    return rows, queries.astype(np.float32)


def _clustered(n, dim, clusters, seed, noise=0.35):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.slow  # a fresh Python process that imports TensorFlow
def test_brute_force_export_in_a_fresh_process_equals_exact_search(
    model, tmp_path, float32_gap
):
    tied, tied_queries = _tied_gallery()
    random_gallery = _clustered(500, DIM, 20, seed=1)
    random_queries = _clustered(60, DIM, 20, seed=2)
    images = np.random.default_rng(3).uniform(0, 255, (7, *SHAPE)).astype("float32")
    for name, gallery in [("tied", tied), ("random", random_gallery)]:
        export_retrieval_model(model, gallery, tmp_path / name, k=5)
    np.save(tmp_path / "tied_q.npy", tied_queries)
    np.save(tmp_path / "random_q.npy", random_queries)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from xbm_tf.retrieval import load_retrieval_model
        out = {{}}
        for name in ("tied", "random"):
            m = load_retrieval_model({str(tmp_path)!r} + "/" + name)
            q = np.load({str(tmp_path)!r} + f"/{{name}}_q.npy")
            for key, value in m.search_embeddings(q).items():
                out[f"{{name}}_{{key}}"] = value
        served = m(np.load({str(tmp_path)!r} + "/images.npy"))
        out.update({{"served_" + k: v for k, v in served.items()}})
        np.savez({str(tmp_path)!r} + "/out.npz", **out)
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="-1")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")

    idx, scores = nearest_neighbors(tied_queries, tied, k=5, backend="exact")
    # Ties straddle the 5th place (duplicates) and fill it (the 40-row group).
    assert (scores[:, 4] == scores[:, 3]).sum() >= 10
    np.testing.assert_array_equal(out["tied_ids"], idx)
    np.testing.assert_array_equal(out["tied_scores"], scores)  # exact on the grid

    idx, scores = nearest_neighbors(random_queries, random_gallery, 5, "exact")
    np.testing.assert_array_equal(out["random_ids"], idx)
    np.testing.assert_allclose(out["random_scores"], scores, rtol=0, atol=SCORE_GAP)

    embeddings = out["served_embeddings"]
    gap = float32_gap(TINY_SUMS)
    want = model.predict(images, verbose=0)
    np.testing.assert_allclose(embeddings, want, rtol=gap, atol=gap)
    idx, scores = nearest_neighbors(embeddings, random_gallery, 5, "exact")
    np.testing.assert_array_equal(out["served_ids"], idx)
    np.testing.assert_allclose(out["served_scores"], scores, rtol=0, atol=SCORE_GAP)


def test_exact_fallback_equals_exact_search(model, tmp_path, monkeypatch):
    from xbm_tf.retrieval import serving

    # Without extra candidates every query's k-th score reaches the end of
    # ScaNN's list, so every query is searched again by the exact fallback.
    monkeypatch.setattr(serving, "_TIE_MARGIN", 0)
    tied, queries = _tied_gallery()
    path = export_retrieval_model(model, tied, tmp_path / "r", k=5)
    out = load_retrieval_model(path).search_embeddings(queries)
    idx, scores = nearest_neighbors(queries, tied, k=5, backend="exact")
    np.testing.assert_array_equal(out["ids"], idx)
    np.testing.assert_array_equal(out["scores"], scores)


@pytest.mark.parametrize("tie_margin", [16, 0])  # 0: every query searched whole
def test_brute_force_equals_exact_search_on_near_duplicates(
    model, tmp_path, monkeypatch, tie_margin, near_duplicates
):
    from xbm_tf.retrieval import serving

    monkeypatch.setattr(serving, "_TIE_MARGIN", tie_margin)
    gallery = near_duplicates(300, DIM, seed=3)
    rng = np.random.default_rng(3)
    queries = gallery[:60] + 0.3 * rng.standard_normal((60, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    path = export_retrieval_model(model, gallery, tmp_path / "r", k=7)
    search = load_retrieval_model(path)
    out = search.search_embeddings(queries)
    idx, scores = nearest_neighbors(queries, gallery, k=7, backend="exact")
    np.testing.assert_array_equal(out["ids"], idx)
    np.testing.assert_allclose(out["scores"], scores, rtol=0, atol=SCORE_GAP)
    # One query at a time gives the same lists as the batch.
    for i in range(0, 60, 7):
        single = search.search_embeddings(queries[i : i + 1])
        np.testing.assert_array_equal(single["ids"][0], out["ids"][i])


def _separated_clusters(num_clusters, size, num_queries, dim, seed):
    """A gallery of tight clusters far apart, and queries drawn beside them.

    Every cosine similarity within a cluster is above 0.98 and between clusters
    below 0.9 (checked by the test), so the answer has no doubt: each query's
    10 nearest items lie in its cluster.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_clusters, dim))
    members = np.repeat(np.arange(num_clusters), size)
    at = rng.integers(0, num_clusters, num_queries)
    rows = np.concatenate([members, at])
    x = centers[rows] + 0.05 * rng.normal(size=(len(rows), dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x[: len(members)], members, x[len(members) :], at


def test_tree_ah_equals_exact_search_on_separated_clusters(model, tmp_path):
    # ScaNN's k-means differs between processes and machines, so the data
    # leave it no choice: 50 clusters of 100 items in 250 leaves (about 5 leaves
    # per cluster); 20 leaves searched hold each query's whole cluster, and its
    # 100 items are the 100 candidates re-scored exactly. The lists then equal
    # exact search in every process (7 fresh processes here).
    gallery, cluster, queries, query_cluster = _separated_clusters(50, 100, 300, DIM, 4)
    sims = queries @ gallery.T
    same = query_cluster[:, None] == cluster[None, :]
    assert sims[same].min() > 0.98 and sims[~same].max() < 0.9  # unambiguous
    exact, exact_scores = nearest_neighbors(queries, gallery, k=10, backend="exact")

    def recall_of(ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])

    path = export_retrieval_model(
        model,
        gallery,
        tmp_path / "ah",
        10,
        index="tree_ah",
        num_leaves=250,
        leaves_to_search=20,
        reorder=100,
    )
    searcher = load_retrieval_model(path)
    assert (searcher.index, searcher.k, searcher.num_items) == ("tree_ah", 10, 5000)
    out = searcher.search_embeddings(queries)
    np.testing.assert_array_equal(out["ids"], exact)
    np.testing.assert_allclose(out["scores"], exact_scores, rtol=0, atol=1e-6)
    # One leaf of a cluster's ~5 holds about a fifth of it: far lower recall.
    path = export_retrieval_model(
        model,
        gallery,
        tmp_path / "narrow",
        10,
        index="tree_ah",
        num_leaves=250,
        leaves_to_search=1,
        reorder=100,
    )
    narrow = load_retrieval_model(path).search_embeddings(queries)["ids"]
    assert recall_of(narrow) < 0.9, recall_of(narrow)


@pytest.mark.parametrize(
    "ids",
    [
        [f"/data/gällery/img_{i:03d}.jpg" for i in range(40)],
        np.arange(40, dtype=np.int64) * 10**12 + 7,  # product ids beyond int32
    ],
    ids=["paths", "large_ints"],
)
def test_ids_round_trip(model, tmp_path, ids):
    gallery = _clustered(40, DIM, 5, seed=6)
    path = export_retrieval_model(model, gallery, tmp_path / "r", k=3, ids=ids)
    out = load_retrieval_model(path).search_embeddings(gallery[:6])
    rows, _ = nearest_neighbors(gallery[:6], gallery, k=3, backend="exact")
    expected = np.asarray(ids, dtype=object)[rows]
    assert out["ids"].tolist() == expected.tolist()
    is_int = isinstance(ids, np.ndarray)
    assert out["ids"].dtype == (np.int64 if is_int else object)


def test_default_ids_are_row_numbers_and_images_are_embedded(model, tmp_path):
    images = np.random.default_rng(7).uniform(0, 255, (30, *SHAPE)).astype("float32")
    path = export_retrieval_model(model, images, tmp_path / "r", k=4)
    searcher = load_retrieval_model(path)
    out = searcher(images[:5])
    embeddings = model.predict(images, verbose=0)
    rows, _ = nearest_neighbors(out["embeddings"], embeddings, k=4, backend="exact")
    np.testing.assert_array_equal(out["ids"], rows)
    assert out["ids"][:, 0].tolist() == [0, 1, 2, 3, 4]  # each image finds itself
    assert searcher(images[:0])["ids"].shape == (0, 4)


@pytest.mark.parametrize("index", ["brute_force", "tree_ah"])
def test_bad_queries_are_refused_inside_the_saved_model(model, tmp_path, index):
    import tensorflow as tf

    rng = np.random.default_rng(12)
    images = rng.uniform(0, 255, (60, *SHAPE)).astype("float32")
    ids = [f"img_{i}.png" for i in range(60)]
    path = export_retrieval_model(model, images, tmp_path / "r", 4, ids, index)
    searcher = load_retrieval_model(path)  # a fresh load of the export
    signatures = searcher.saved_model.signatures  # what any client calls
    assert searcher.index_info() == {"k": 4, "index": index, "num_items": 60}
    info = signatures["index_info"]()
    assert (int(info["k"]), int(info["num_items"])) == (4, 60)

    good = searcher(images[:3])["embeddings"]
    nan_image = images[:3].copy()
    nan_image[1] = np.nan  # an image full of NaN
    inf_pixel = images[:3].copy()
    inf_pixel[2, 5, 7, 0] = np.inf
    nan_row = np.full((1, DIM), np.nan, np.float32)
    two_rows = np.stack([good[0], nan_row[0]])
    zero_row = np.concatenate([good, np.zeros((1, DIM), np.float32)])
    inf_row = good.copy()
    inf_row[0, 3] = -np.inf
    refused = [
        ("serving_default", "images", nan_image, r"`images` row 1 \(of 3\) has a NaN"),
        ("serving_default", "images", inf_pixel, r"`images` row 2 \(of 3\) has a NaN"),
        ("search_embeddings", "embeddings", nan_row, r"`embeddings` row 0 \(of 1\)"),
        ("search_embeddings", "embeddings", two_rows, r"`embeddings` row 1 \(of 2\)"),
        ("search_embeddings", "embeddings", zero_row, r"row 3 \(of 4\) is all zeros"),
        ("search_embeddings", "embeddings", inf_row, r"`embeddings` row 0 \(of 3\)"),
    ]
    for name, key, value, message in refused:
        call = searcher if name == "serving_default" else searcher.search_embeddings
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            call(value)
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signatures[name](**{key: tf.constant(value)})

    # An empty batch gives empty outputs of the right shapes and types.
    out = searcher(images[:0])
    assert out["ids"].shape == out["scores"].shape == (0, 4)
    assert out["embeddings"].shape == (0, DIM) and out["ids"].dtype == object
    out = signatures["search_embeddings"](embeddings=tf.zeros((0, DIM)))
    assert out["ids"].shape == (0, 4) and out["ids"].dtype == tf.string
    # Each query row gives one output row, the same as searched alone.
    queries = np.concatenate([good, -good[:2], good[:1] * 1e-3])
    out = searcher.search_embeddings(queries)
    assert out["ids"].shape == out["scores"].shape == (6, 4)
    for i, query in enumerate(queries):
        alone = searcher.search_embeddings(query[None])
        assert alone["ids"].tolist() == out["ids"][i : i + 1].tolist()


def test_embed_gallery_from_dataset_keeps_labels_and_thumbnails(model, float32_gap):
    import tensorflow as tf

    images = np.random.default_rng(8).uniform(0, 255, (10, *SHAPE)).astype("float32")
    labels = np.arange(10) % 3
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    emb, got_labels, thumbs = embed_gallery(model, ds, thumbnail_size=6)
    gap = float32_gap(TINY_SUMS)
    want = model.predict(images, verbose=0)
    np.testing.assert_allclose(emb, want, rtol=gap, atol=gap)
    assert got_labels.tolist() == labels.tolist()
    assert thumbs.shape == (10, 6, 6, 1) and thumbs.dtype == np.uint8
    emb, got_labels, _ = embed_gallery(model, ds.map(lambda x, y: x))
    assert got_labels is None and emb.shape == (10, DIM)


def test_scann_missing_is_a_clear_error(model, tmp_path, monkeypatch):
    gallery = _clustered(20, DIM, 2, seed=9)
    path = export_retrieval_model(model, gallery, tmp_path / "r", k=2)
    monkeypatch.setitem(sys.modules, "scann", None)
    monkeypatch.setitem(sys.modules, "scann.scann_ops.py.scann_ops", None)
    with pytest.raises(ImportError, match=r"pip install scann\[tf\]"):
        load_retrieval_model(path)
    with pytest.raises(ImportError, match="embedding-only export"):
        export_retrieval_model(model, gallery, tmp_path / "other", k=2)
    assert not (tmp_path / "other").exists()


def test_bad_inputs_fail_before_writing(model, tmp_path):
    gallery = _clustered(20, DIM, 2, seed=10)
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="width 8 but the embedding model .* 16"):
        export_retrieval_model(model, gallery[:, :8], out)
    with pytest.raises(ValueError, match="k=21 is larger than the gallery"):
        export_retrieval_model(model, gallery, out, k=21)
    with pytest.raises(ValueError, match="`ids` has 3 entries .* 20 items"):
        export_retrieval_model(model, gallery, out, k=2, ids=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"all strings or all integers.*int.*str"):
        export_retrieval_model(model, gallery, out, k=2, ids=[1, "b"] * 10)
    with pytest.raises(ValueError, match=r"Unknown index 'ivf'.*brute_force"):
        export_retrieval_model(model, gallery, out, index="ivf")
    with pytest.raises(ValueError, match="leaves_to_search=9 exceeds num_leaves=2"):
        export_retrieval_model(
            model, gallery, out, 2, index="tree_ah", num_leaves=2, leaves_to_search=9
        )
    wrapper = keras.Sequential([model])
    wrapper.embedding_model = model
    with pytest.raises(ValueError, match="pass its `.embedding_model`"):
        export_retrieval_model(wrapper, gallery, out)
    assert os.listdir(tmp_path) == []


def test_never_overwrites_and_never_leaves_a_partial_directory(
    model, tmp_path, monkeypatch
):
    gallery = _clustered(20, DIM, 2, seed=11)
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_retrieval_model(model, gallery, out, k=2)
    assert os.listdir(out) == ["keep.txt"]

    archive_class = type(keras.export.ExportArchive())

    def failing_write_out(self, filepath, options=None, verbose=True):
        os.makedirs(filepath)
        open(os.path.join(filepath, "saved_model.pb"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(archive_class, "write_out", failing_write_out)
    with pytest.raises(OSError, match="disk full"):
        export_retrieval_model(model, gallery, out, k=2, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["r"] and os.listdir(out) == ["keep.txt"]

    export_retrieval_model(model, gallery, out, k=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["r"]
    assert load_retrieval_model(out).k == 2


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.*not a TensorFlow"):
        load_retrieval_model(tmp_path / "nothing")
    embedding_export = tmp_path / "embedding"
    from xbm_tf.export import export_embedding_model

    embedder = build_embedding_model("tiny", 4, input_shape=SHAPE)
    export_embedding_model(embedder, embedding_export)
    with pytest.raises(ValueError, match="not a retrieval export.*search_embeddings"):
        load_retrieval_model(embedding_export)
