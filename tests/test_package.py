"""The public API is what __all__ says, and the version is the package's."""

from __future__ import annotations

import re
import sys
import types

import xbm_tf


def test_each_public_name_is_the_object_of_its_home_module():
    assert len(set(xbm_tf.__all__)) == len(xbm_tf.__all__)
    for name in xbm_tf.__all__:
        if name == "__version__":
            continue
        obj = getattr(xbm_tf, name)
        if isinstance(obj, types.ModuleType):
            assert obj.__name__ == f"xbm_tf.{name}", name
            continue
        # A class or function of the package, exported under its own name, and
        # the very object its module defines (not a copy or a wrapper).
        assert obj.__name__ == name, (name, obj)
        assert obj.__module__.startswith("xbm_tf."), (name, obj.__module__)
        assert getattr(sys.modules[obj.__module__], name) is obj, name


def test_the_names_the_readme_example_uses_are_public():
    used = {
        "XBMContrastiveModel",
        "CrossBatchMemory",
        "ContrastiveLoss",
        "TripletLoss",
        "MultiSimilarityLoss",
        "build_embedding_model",
        "make_optimizer",
        "TerminateOnNonFinite",
        "RetrievalEvaluation",
        "FeatureDrift",
        "export_embedding_model",
        "export_retrieval_model",
        "load_retrieval_model",
        "data",
    }
    assert used <= set(xbm_tf.__all__), used - set(xbm_tf.__all__)
    assert xbm_tf.XBMContrastiveModel.__module__ == "xbm_tf.model"
    assert xbm_tf.CrossBatchMemory.__module__ == "xbm_tf.memory"


def test_version_is_the_one_setup_py_reads():
    assert re.fullmatch(r"\d+\.\d+\.\d+", xbm_tf.__version__), xbm_tf.__version__
    init = open(xbm_tf.__file__).read()
    assert f'\n__version__ = "{xbm_tf.__version__}"\n' in init
