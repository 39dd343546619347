"""A many-class dataset rendered from the fonts matplotlib installs (no download).

Each class is one character, each image one rendering of it in one of 16 font
faces that ship with matplotlib (`mpl-data/fonts/ttf`): DejaVu Sans, DejaVu Sans
Mono, DejaVu Serif and STIX General, in four styles each (regular, bold, italic or
oblique, bold italic). It is the many-class regime of the XBM paper (SOP: 11,318
classes of about 5 images) at CPU size: 500 classes of 16 images (263 to train, 237 to
test), so a batch of 16 (4 classes) sees under 2% of the training classes.

Recipe (every step is in this module; nothing is cached on disk):

1. Characters: the code points that all 16 faces map (their character maps read
   with matplotlib's FreeType wrapper), of the Unicode categories letter (L*),
   number (N*), symbol (S*) and punctuation (P*), whose render has ink in every
   face.
2. Images: each character is rendered with Pillow at `RENDER_SIZE` px, its ink
   cropped, padded to a square (centred) and scaled with a box filter to
   `INK_SIZE` = 28 px, centred in a `IMAGE_SIZE` = 32 x 32 uint8 image, white on
   black, one channel.
3. Look-alikes: characters are visited in code-point order; with the "mean
   render" of a character the mean of its 16 images in [0, 1], a character is
   dropped when its mean render lies within `LOOKALIKE_DISTANCE` (mean absolute
   pixel difference) of a character kept before it (one glyph under several
   code points: Greek Alpha and Cyrillic A after Latin A, accented capitals whose
   accents differ only in direction), or within `CASE_DISTANCE` of its own other
   case if that was kept (case pairs that look alike once scaled to the same
   size: o/O, s/S, x/X, Cyrillic ya/YA, ...).
4. Split by class: a character trains when the CRC-32 of `"U+XXXX"` (its code
   point in hex, at least 4 digits) is even, otherwise it is a test class. A
   class's side depends on its code point only, not on which other classes
   survived step 3.

Labels are the code points (`chr(label)` is the character). With Pillow 13.0
(FreeType 2.14.3) and matplotlib 3.11.2, 727 characters are common to the faces
and 500 survive the look-alike rule: 263 train classes (4,208 images) and 237
test classes (3,792 images) (`tests/data/test_glyphs.py` checks the bounds, not
the exact count).

Identical run to run: everything (the same library versions render the same
pixels; the rule and the split have no randomness). What can change with the
FreeType or Pillow version (anti-aliasing, hinting, rasterisation): pixel values
by a few levels at glyph edges, and so, for characters whose mean render lies
near a threshold, whether they are dropped as look-alikes; and with matplotlib's
version the font files themselves. The split of a given character never changes.
"""

from __future__ import annotations

import functools
import os
import unicodedata
import zlib

import numpy as np

from xbm_tf.data.splits import ImageSet, RetrievalSplits

GLYPH_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
CATEGORIES = ("L", "N", "S", "P")
RENDER_SIZE = 48
INK_SIZE = 28
IMAGE_SIZE = 32
LOOKALIKE_DISTANCE = 0.04
CASE_DISTANCE = 0.11


def _font_paths() -> list[str]:
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(folder, name) for name in GLYPH_FONT_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"The glyphs dataset needs matplotlib's font files; missing {missing}. "
            "Reinstall matplotlib (pip install --force-reinstall matplotlib)."
        )
    return paths


def _common_code_points(paths: list[str]) -> list[int]:
    """Code points of the `CATEGORIES` that every face maps, ascending."""
    from matplotlib.ft2font import FT2Font

    common = None
    for path in paths:
        mapped = set(FT2Font(path).get_charmap())
        common = mapped if common is None else common & mapped
    return sorted(cp for cp in common if unicodedata.category(chr(cp))[0] in CATEGORIES)


def _fit(ink: np.ndarray) -> np.ndarray:
    """A rendered glyph's ink, cropped, padded square, scaled and centred."""
    from PIL import Image

    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = ink.shape
    side = max(height, width)
    square = np.zeros((side, side), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = ink
    scaled = Image.fromarray(square).resize((INK_SIZE, INK_SIZE), Image.BOX)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    offset = (IMAGE_SIZE - INK_SIZE) // 2
    image[offset : offset + INK_SIZE, offset : offset + INK_SIZE] = scaled
    return image


def render_glyphs(code_points, paths: list[str] | None = None) -> np.ndarray:
    """Renders characters in every face: uint8 `(C, F, 32, 32)`.

    Args:
        code_points: the C characters, as integers.
        paths: the F font files (default: matplotlib's `GLYPH_FONT_FILES`).

    Returns:
        The images; an all-zero image where a face draws no ink.
    """
    from PIL import ImageFont

    paths = _font_paths() if paths is None else paths
    code_points = list(code_points)
    images = np.zeros((len(code_points), len(paths), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for f, path in enumerate(paths):
        font = ImageFont.truetype(path, RENDER_SIZE)
        for c, cp in enumerate(code_points):
            mask = font.getmask(chr(cp), mode="L")
            width, height = mask.size
            if width == 0 or height == 0:
                continue
            ink = np.asarray(mask, np.uint8).reshape(height, width)
            if ink.any():
                images[c, f] = _fit(ink)
    return images


def drop_lookalikes(
    code_points,
    mean_renders: np.ndarray,
    lookalike_distance: float = LOOKALIKE_DISTANCE,
    case_distance: float = CASE_DISTANCE,
) -> np.ndarray:
    """The look-alike rule: a boolean mask of the characters kept.

    Visits the characters in the given order. Character `c` is dropped when the
    mean absolute difference between its mean render and that of a character
    kept before it is below `lookalike_distance`, or when its other case
    (`str.swapcase`, if one character) was kept before it and their mean renders
    differ by less than `case_distance`.

    Args:
        code_points: C integers.
        mean_renders: `(C, ...)` float mean render of each character, in [0, 1].
        lookalike_distance: the threshold between any two characters.
        case_distance: the threshold between a character and its other case.

    Returns:
        bool `(C,)`, True for the characters kept.
    """
    code_points = [int(cp) for cp in code_points]
    flat = np.asarray(mean_renders, np.float32).reshape(len(code_points), -1)
    kept_rows: list[int] = []
    row_of: dict[int, int] = {}
    keep = np.zeros(len(code_points), bool)
    for i, cp in enumerate(code_points):
        if kept_rows:
            distance = np.abs(flat[kept_rows] - flat[i]).mean(axis=1)
            if distance.min() < lookalike_distance:
                continue
        other = chr(cp).swapcase()
        if len(other) == 1 and ord(other) in row_of:
            j = row_of[ord(other)]
            if np.abs(flat[j] - flat[i]).mean() < case_distance:
                continue
        keep[i] = True
        kept_rows.append(i)
        row_of[cp] = i
    return keep


def is_train_class(code_point: int) -> bool:
    """The split rule: True when the CRC-32 of `"U+XXXX"` is even."""
    return zlib.crc32(f"U+{int(code_point):04X}".encode("ascii")) % 2 == 0


@functools.lru_cache(maxsize=1)
def _dataset() -> tuple[np.ndarray, np.ndarray]:
    """`(images (C, F, 32, 32) uint8, code points (C,) int64)` of the kept classes."""
    paths = _font_paths()
    code_points = _common_code_points(paths)
    images = render_glyphs(code_points, paths)
    inked = images.reshape(len(code_points), len(paths), -1).any(axis=2).all(axis=1)
    images = images[inked]
    code_points = np.asarray(code_points, np.int64)[inked]
    keep = drop_lookalikes(code_points, images.mean(axis=1) / 255.0)
    images, code_points = images[keep], code_points[keep]
    images.setflags(write=False)
    code_points.setflags(write=False)
    return images, code_points


def load_glyphs(*, max_per_class: int | None = None) -> RetrievalSplits:
    """Loads the glyphs dataset: 500 characters x 16 font faces, split by class.

    Renders the characters once per process (about 5 s on a CPU core; later calls
    reuse the arrays); reads matplotlib's font files and writes nothing.

    Args:
        max_per_class: keep only the first `max_per_class` faces of each class
            (in the order of `GLYPH_FONT_FILES`; all 16 if None).

    Returns:
        `RetrievalSplits` with `train` and `test` `ImageSet`s of uint8 arrays
        `(N, 32, 32, 1)` (white glyph on black); labels are code points. Train
        and test classes are disjoint (`is_train_class`).

    Raises:
        ValueError: `max_per_class` is not positive.
        FileNotFoundError: a font file of matplotlib is missing.

    Example:

    >>> splits = load_glyphs()
    >>> splits.train.num_classes > 200, len(splits.train) // splits.train.num_classes
    (True, 16)
    >>> chr(splits.train.labels[0])
    '!'
    """
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}.")
    images, code_points = _dataset()
    faces = images.shape[1] if max_per_class is None else min(max_per_class, 16)
    flat = images[:, :faces].reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)
    labels = np.repeat(code_points, faces)
    train = np.array([is_train_class(cp) for cp in labels])
    everything = ImageSet(flat, labels, "glyphs")
    return RetrievalSplits(
        train=everything.subset(train, "glyphs/train"),
        test=everything.subset(~train, "glyphs/test"),
        name="glyphs",
    )
