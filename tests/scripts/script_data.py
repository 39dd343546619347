"""For the script tests: datasets in their real layouts, from quickstart images,
and a callback that interrupts a run as a kill would."""

from __future__ import annotations

import os

import keras
import numpy as np


def write_inshop(root, corrupt=()) -> str:
    """An In-Shop folder in the real layout, from quickstart images (JPEG).

    Training: 5 items (digits 0-4) of 4 images; query and gallery: 4 items
    (digits 5-8), 2 query and 3 gallery images each. `corrupt` names images
    (e.g. `"img/gallery/id_00000102/1.jpg"`) written truncated.
    """
    from PIL import Image

    from xbm_tf.data import load_quickstart

    splits = load_quickstart(max_per_class=12)
    rows = []
    for status, image_set, classes, counts in (
        ("train", splits.train, range(5), (4,)),
        ("query", splits.test, range(5, 9), (2,)),
        ("gallery", splits.test, range(5, 9), (2, 5)),
    ):
        first, last = (0, counts[0]) if len(counts) == 1 else counts
        for c in classes:
            members = np.flatnonzero(image_set.labels == c)[first:last]
            item = f"id_{100 + c:08d}"
            for n, i in enumerate(members):
                name = f"img/{status}/{item}/{n}.jpg"
                path = os.path.join(root, "Img", name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(image_set.images[i][..., 0]).convert("RGB").save(
                    path, format="JPEG", quality=95
                )
                if name in corrupt:
                    with open(path, "rb") as f:
                        whole = f.read()
                    with open(path, "wb") as f:
                        f.write(whole[: len(whole) // 2])  # truncated
                rows.append(f"{name} {item} {status}")
    os.makedirs(os.path.join(root, "Eval"), exist_ok=True)
    with open(os.path.join(root, "Eval", "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(rows)}\nimage_name item_id evaluation_status\n")
        f.write("\n".join(rows) + "\n")
    return str(root)


# The flags that put the smoke config on a write_inshop folder (R@K as In-Shop's
# protocol allows on 12 gallery images).
INSHOP_ARGS = ("--dataset=inshop", "--recall_ks=1,2,4,8")


class AtStep(keras.callbacks.Callback):
    """Calls `action(model)` once the optimizer has applied step `step`: a
    kill, an interrupt or a fault injected at a known point of a run."""

    def __init__(self, step, action):
        super().__init__()
        self.step = step
        self.action = action

    def on_train_batch_end(self, batch, logs=None):
        iterations = keras.ops.convert_to_numpy(self.model.optimizer.iterations)
        if int(iterations) == self.step:
            self.action(self.model)


def _interrupt(model):
    raise KeyboardInterrupt("simulated kill")


def stop_after(step) -> AtStep:
    """Interrupts the run after optimizer step `step` (a killed process)."""
    return AtStep(step, _interrupt)
