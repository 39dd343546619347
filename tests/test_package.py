"""The public API is what __all__ says, and the version is the package's."""

from __future__ import annotations

import xbm_tf


def test_all_names_resolve_and_version():
    for name in xbm_tf.__all__:
        assert getattr(xbm_tf, name) is not None, name
    assert xbm_tf.__version__.count(".") == 2
    assert xbm_tf.XBMContrastiveModel.__module__ == "xbm_tf.model"
