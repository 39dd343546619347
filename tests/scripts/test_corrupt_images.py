"""Every split a script reads is screened for corrupt images before long work."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import evaluate  # noqa: E402
import index  # noqa: E402
import train  # noqa: E402
from script_data import INSHOP_ARGS, write_inshop  # noqa: E402

from xbm_tf.backbones import build_embedding_model  # noqa: E402

BAD = {
    "train": "img/train/id_00000100/1.jpg",
    "query": "img/query/id_00000105/0.jpg",
    "gallery": "img/gallery/id_00000106/2.jpg",
}


class _LongWork(Exception):
    """Raised where the long work (training, embedding) would start."""


def _stop(*args, **kwargs):
    raise _LongWork


@pytest.fixture(scope="module")
def inshop(tmp_path_factory):
    return write_inshop(tmp_path_factory.mktemp("inshop"), corrupt=BAD.values())


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = build_embedding_model("tiny", 8, input_shape=(28, 28, 1), weights=None)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return str(path)


def _reported(out: str, split: str) -> bool:
    line = f"Skipping 1 corrupt image of inshop/{split} ("
    return line in out and BAD[split] in out.split(line)[1].splitlines()[0]


def test_train_screens_training_query_and_gallery_before_training(
    parse, tmp_path, inshop, capsys, monkeypatch
):
    monkeypatch.setattr(train, "build_model", _stop)
    parse(f"--workdir={tmp_path / 'run'}", *INSHOP_ARGS, f"--data_dir={inshop}")
    with pytest.raises(_LongWork):
        train.run()
    out = capsys.readouterr().out
    for split in ("train", "query", "gallery"):
        assert _reported(out, split), (split, out)
    # The splits described (and used) are the screened ones.
    assert "inshop/gallery: 11 images" in out and "inshop/query: 7 images" in out


def test_evaluate_screens_query_and_gallery_before_embedding(
    parse, tmp_path, inshop, model_file, capsys, monkeypatch
):
    monkeypatch.setattr(evaluate, "load_model", _stop)
    parse(*INSHOP_ARGS, f"--data_dir={inshop}", f"--model={model_file}")
    with pytest.raises(_LongWork):
        evaluate.run()
    out = capsys.readouterr().out
    assert _reported(out, "query") and _reported(out, "gallery")
    assert "inshop/train" not in out  # not read: not screened


@pytest.mark.parametrize("split", ["train", "query", "gallery"])
def test_index_screens_its_split_before_embedding(
    parse, tmp_path, inshop, model_file, capsys, monkeypatch, split
):
    monkeypatch.setattr(index, "embed_gallery", _stop)
    parse(
        *INSHOP_ARGS,
        f"--data_dir={inshop}",
        f"--model={model_file}",
        f"--split={split}",
        f"--output={tmp_path / 'r'}",
        "--search_k=2",
    )
    with pytest.raises(_LongWork):
        index.run()
    out = capsys.readouterr().out
    assert _reported(out, split)
    assert out.count("Skipping") == 1  # only the split it indexes
    assert not (tmp_path / "r").exists()


def test_index_screens_an_images_folder(
    parse, tmp_path, inshop, model_file, capsys, monkeypatch
):
    monkeypatch.setattr(index, "embed_gallery", _stop)
    folder = os.path.join(inshop, "Img", "img", "gallery")
    parse(f"--model={model_file}", f"--images={folder}", f"--output={tmp_path / 'r'}")
    with pytest.raises(_LongWork):
        index.run()
    out = capsys.readouterr().out
    bad = os.path.join(inshop, "Img", BAD["gallery"])
    assert f"Skipping 1 corrupt image of {folder} ({bad}: " in out
    assert "11 images" in out  # 12 files, 1 skipped
