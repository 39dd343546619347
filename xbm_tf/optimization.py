"""The optimizer of the paper's recipe: Adam or SGD, weight decay, step decay."""

from __future__ import annotations

import keras

OPTIMIZERS = ("adam", "sgd")


def make_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-4,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    decay_steps: list[int] | tuple[int, ...] = (),
    decay_factor: float = 0.1,
) -> keras.optimizers.Optimizer:
    """An optimizer with a piecewise-constant (step) learning-rate schedule.

    The learning rate is multiplied by `decay_factor` at each of `decay_steps`.
    Weight decay is Keras' decoupled weight decay (AdamW-style for Adam); the
    reference PyTorch code adds an L2 term to the gradient instead.

    Args:
        name: `"adam"` or `"sgd"` (with momentum).
        learning_rate: the initial learning rate.
        weight_decay: the decoupled weight decay (0 disables it).
        momentum: SGD momentum.
        decay_steps: increasing optimizer steps at which the rate drops.
        decay_factor: the factor applied at each of `decay_steps`.

    Returns:
        A `keras.optimizers.Optimizer`.

    Example:
    >>> opt = make_optimizer("adam", 1e-4, 5e-4, decay_steps=[4000])
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    steps = [int(s) for s in decay_steps]
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(s <= 0 for s in steps):
        raise ValueError(f"decay_steps must be increasing and positive, got {steps}")
    schedule = learning_rate
    if steps:
        values = [learning_rate * decay_factor**i for i in range(len(steps) + 1)]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(steps, values)
    decay = weight_decay if weight_decay > 0 else None
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=schedule, weight_decay=decay)
    return keras.optimizers.SGD(
        learning_rate=schedule, momentum=momentum, weight_decay=decay
    )
