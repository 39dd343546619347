"""The thin `keras.losses.Loss` wrapper shared by every pair loss.

Every pair-loss function has the signature `f(query_embeddings, query_labels,
key_embeddings, key_labels, key_mask=None, query_key_index=None, **hparams)`; its
keyword hyper-parameters and their defaults are written once, in the function, and
the wrapper classes read them from there (`hyper_parameters`).
"""

from __future__ import annotations

import inspect

import keras
from keras import ops

from xbm_tf.losses.pairs import check_labels

__all__ = ["PAIR_REDUCTIONS", "PairLoss", "check_pair_reduction", "hyper_parameters"]

# How a loss combines one query's pair (or triplet) terms; see `contrastive_loss`
# and `triplet_loss`. "sum" is the paper's and the default.
PAIR_REDUCTIONS = ("sum", "mean")

SIGNATURE = (
    "query_embeddings",
    "query_labels",
    "key_embeddings",
    "key_labels",
    "key_mask",
    "query_key_index",
)
REQUIRED = inspect.Parameter.empty


def hyper_parameters(fn) -> dict:
    """The keyword hyper-parameters of a pair-loss function, with their defaults.

    Args:
        fn: a function `f(query_embeddings, query_labels, key_embeddings,
            key_labels, key_mask=None, query_key_index=None, **hparams)`.

    Returns:
        `{name: default}` for every parameter after the six of the signature, in
        order; a parameter without a default maps to `inspect.Parameter.empty`.

    Example:
    >>> from xbm_tf.losses import contrastive_loss
    >>> hyper_parameters(contrastive_loss)
    {'neg_margin': 0.5, 'pair_reduction': 'sum'}
    """
    params = list(inspect.signature(fn).parameters.values())
    names = tuple(p.name for p in params[: len(SIGNATURE)])
    if names != SIGNATURE:
        raise TypeError(
            f"{getattr(fn, '__name__', fn)} must have the pair-loss signature "
            f"f({', '.join(SIGNATURE)}, **hyper_parameters); got f({', '.join(names)})"
        )
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[len(SIGNATURE) :] if p.kind in kinds}


def check_pair_reduction(pair_reduction: str) -> str:
    """`pair_reduction`, or a ValueError naming the choices."""
    if pair_reduction not in PAIR_REDUCTIONS:
        raise ValueError(
            f"pair_reduction must be one of {PAIR_REDUCTIONS}, got {pair_reduction!r}"
        )
    return pair_reduction


@keras.saving.register_keras_serializable(package="xbm_tf")
class PairLoss(keras.losses.Loss):
    """A loss between queries and keys, used in-batch as a `keras.losses.Loss`.

    Wraps a pure per-query function `fn(query_embeddings, query_labels,
    key_embeddings, key_labels, key_mask=None, query_key_index=None, **hparams)`
    (e.g. `contrastive_loss`). As a Keras loss, `loss(y_true, y_pred)` takes integer
    labels as `y_true` (any integer dtype; they are never cast to the loss dtype,
    and float labels are a TypeError) and L2-normalised embeddings as `y_pred`,
    compares the batch with itself (each sample excluded from its own pairs) and
    reduces the per-query losses with the usual Keras reduction (by default the
    mean over queries, as in the paper; `sample_weight` weights the queries).
    `XBMContrastiveModel` calls `pair_loss` directly, once with the batch as keys
    and once with the memory as keys.

    The hyper-parameters are those of `fn`, with its defaults. Each is a read-only
    attribute of the loss and an entry of its config: setting one raises an
    AttributeError, since a compiled train step has it traced in (build a new loss
    and compile again).

    A `PairLoss(my_fn)` saves into `.keras` files when `my_fn` is registered with
    `@keras.saving.register_keras_serializable()`; otherwise `get_config` (and so
    `model.save`) raises a ValueError that says so.

    Args:
        fn: the per-query loss function.
        name: as in `keras.losses.Loss`.
        reduction: as in `keras.losses.Loss`.
        dtype: as in `keras.losses.Loss`.
        **hyper_parameters_: the function's hyper-parameters (e.g. `neg_margin`).

    Example:
    >>> import numpy as np
    >>> from xbm_tf.losses import contrastive_loss
    >>> @keras.saving.register_keras_serializable(package="my_project")
    ... def scaled_contrastive(query_embeddings, query_labels, key_embeddings,
    ...                        key_labels, key_mask=None, query_key_index=None,
    ...                        scale=1.0):
    ...     return scale * contrastive_loss(
    ...         query_embeddings, query_labels, key_embeddings, key_labels,
    ...         key_mask=key_mask, query_key_index=query_key_index)
    >>> loss = PairLoss(scaled_contrastive, scale=2.0)
    >>> loss.hyper_parameters
    {'scale': 2.0}
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], "float32")
    >>> float(loss(labels, embeddings))  # 2 x (1 - 0 + 1): a far positive, a copy
    4.0
    """

    def __init__(
        self,
        fn,
        name: str | None = None,
        reduction="sum_over_batch_size",
        dtype=None,
        **hyper_parameters_,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not callable(fn):
            raise TypeError(f"fn must be a pair-loss function, got {fn!r}")
        defaults = hyper_parameters(fn)
        owner = type(self).__name__
        given = dict(hyper_parameters_)
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise TypeError(
                f"{owner}: unknown hyper-parameter(s) {unknown}; "
                f"{getattr(fn, '__name__', 'fn')} takes {sorted(defaults)}"
            )
        values = {**defaults, **given}
        missing = sorted(k for k, v in values.items() if v is REQUIRED)
        if missing:
            raise TypeError(f"{owner}: missing hyper-parameter(s) {missing}")
        self.__dict__["_fn"] = fn
        self.__dict__["_hyper_parameters"] = values

    @property
    def fn(self):
        """The per-query loss function (read-only)."""
        return self._fn

    @property
    def hyper_parameters(self) -> dict:
        """A copy of `{name: value}` of the hyper-parameters passed to `fn`."""
        return dict(self._hyper_parameters)

    def __getattr__(self, name):
        # Only called when the normal lookup fails: the hyper-parameters.
        values = self.__dict__.get("_hyper_parameters", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_hyper_parameters", {}) or name == "fn":
            raise AttributeError(
                f"{type(self).__name__}.{name} is read-only: the hyper-parameters "
                "are fixed at construction (a compiled train step has them traced "
                f"in). Build a new loss, e.g. {type(self).__name__}({name}="
                f"{value!r}, ...), and pass it to the model or to compile(loss=...)"
            )
        super().__setattr__(name, value)

    def pair_loss(
        self,
        query_embeddings,
        query_labels,
        key_embeddings,
        key_labels,
        key_mask=None,
        query_key_index=None,
    ):
        """Per-query losses `(B,)` of the queries against the keys."""
        return self._fn(
            query_embeddings,
            query_labels,
            key_embeddings,
            key_labels,
            key_mask=key_mask,
            query_key_index=query_key_index,
            **self._hyper_parameters,
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Not keras.losses.Loss.__call__: it casts y_true to the loss dtype, which
        # merges labels from 2^24 (float32) or 2048 (float16).
        with keras.name_scope(self.name):
            labels = check_labels(ops.reshape(y_true, (-1,)), "y_true (labels)")
            losses = self.call(labels, ops.convert_to_tensor(y_pred, self.dtype))
            losses = ops.cast(losses, "float32")
            if sample_weight is not None:
                sample_weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
                losses = losses * sample_weight
            if self.reduction in (None, "none"):
                return ops.cast(losses, self.dtype)
            total = ops.sum(losses)
            if self.reduction == "sum":
                return ops.cast(total, self.dtype)
            weighted = sample_weight is not None
            if self.reduction == "mean_with_sample_weight" and weighted:
                count = ops.sum(sample_weight)
            else:
                count = ops.cast(ops.shape(losses)[0], "float32")
            return ops.cast(ops.divide_no_nan(total, count), self.dtype)

    def call(self, y_true, y_pred):
        labels = ops.reshape(y_true, (-1,))
        batch_size = ops.shape(y_pred)[0]
        own = ops.arange(batch_size, dtype="int32")
        return self.pair_loss(y_pred, labels, y_pred, labels, query_key_index=own)

    def get_config(self):
        config = {**super().get_config(), **self._hyper_parameters}
        if type(self) is PairLoss:
            config["fn"] = _serialize_function(self._fn)
        else:
            _check_registered_class(type(self))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "fn" in config:
            config["fn"] = keras.saving.deserialize_keras_object(config["fn"])
        return cls(**config)


def _serialize_function(fn) -> dict:
    """The Keras config of a registered function, or a ValueError saying how."""
    name = keras.saving.get_registered_name(fn)
    if keras.saving.get_registered_object(name) is not fn:
        label = getattr(fn, "__name__", repr(fn))
        raise ValueError(
            f"PairLoss({label}) cannot be saved: its function is not registered "
            "with Keras. Decorate it with "
            "@keras.saving.register_keras_serializable(package='your_package') "
            "(a named module-level function, not a lambda), and import that module "
            "before keras.models.load_model"
        )
    return keras.saving.serialize_keras_object(fn)


def _check_registered_class(cls) -> None:
    """A ValueError saying how, for a subclass Keras could not load again."""
    if keras.saving.get_registered_object(keras.saving.get_registered_name(cls)) is cls:
        return
    raise ValueError(
        f"{cls.__name__} cannot be saved: this PairLoss subclass is not registered "
        "with Keras, so keras.models.load_model could not rebuild it. Decorate it "
        "with @keras.saving.register_keras_serializable(package='your_package'), "
        "and import that module before keras.models.load_model"
    )
