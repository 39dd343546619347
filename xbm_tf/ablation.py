"""The paper's Fig. 1 as data: the run grid of a memory ablation and its summary.

`scripts/ablation.py` trains every run of `plan_runs(...)` and records one row per
finished run; the functions here turn those rows into the per-condition mean and
standard deviation over seeds (`aggregate`), the seed-paired gain of the memory
(`memory_gains`) and a Markdown report (`markdown_report`). They are pure: no
files, no flags.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "UNTRAINED_RECALL",
    "WITH_MEMORY",
    "WITHOUT_MEMORY",
    "AblationRun",
    "aggregate",
    "collapsed_runs",
    "markdown_report",
    "memory_gains",
    "plan_runs",
]

WITH_MEMORY = "with memory"
WITHOUT_MEMORY = "without memory"
_CONDITIONS = (WITHOUT_MEMORY, WITH_MEMORY)
# A row's Recall@1 of the untrained network (the run's "before" evaluation).
UNTRAINED_RECALL = "untrained_recall@1"


@dataclasses.dataclass(frozen=True)
class AblationRun:
    """One training run of the ablation.

    Attributes:
        condition: `WITH_MEMORY` or `WITHOUT_MEMORY` (memory loss weight 0).
        p: classes per batch.
        k: images per class.
        memory_size: rows of the memory; 0 for `WITHOUT_MEMORY`.
        seed: the run's random seed.
    """

    condition: str
    p: int
    k: int
    memory_size: int
    seed: int

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    @property
    def name(self) -> str:
        """A short unique name, used as the run's folder and record key."""
        if self.condition == WITH_MEMORY:
            return f"with_b{self.batch_size}_m{self.memory_size}_s{self.seed}"
        return f"without_b{self.batch_size}_s{self.seed}"


def _positive_ints(values, name: str) -> list[int]:
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty.")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ValueError(f"{name} must be integers; got {bad}.")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}.")
    return values


def plan_runs(
    batch_sizes: Sequence[int],
    memory_sizes: Sequence[int],
    seeds: Sequence[int],
    k: int,
) -> list[AblationRun]:
    """Every run of {without, with memory} x batch size x memory size x seed.

    The runs without memory do not depend on the memory size, so there is one per
    batch size and seed. The order is seed-major, so that a partly finished
    ablation already holds whole seeds of every condition.

    Args:
        batch_sizes: global batch sizes; each a multiple of `k` with P = batch / k
            of at least 2 classes.
        memory_sizes: memory rows for the runs with memory; each at least the
            largest batch size.
        seeds: random seeds.
        k: images per class (the flagfile's `--k`).

    Returns:
        The list of `AblationRun`s.

    Raises:
        ValueError: a batch size that is not a multiple of `k` or holds fewer than
            2 classes, a memory smaller than a batch, duplicates or empty lists.

    Example:
    >>> print(*(r.name for r in plan_runs([16], [64], [0], k=4)))
    without_b16_s0 with_b16_m64_s0
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2; got {k!r}.")
    batch_sizes = _positive_ints(batch_sizes, "batch_sizes")
    memory_sizes = _positive_ints(memory_sizes, "memory_sizes")
    seeds = _positive_ints(seeds, "seeds")
    bad = [b for b in batch_sizes if b % k or b // k < 2]
    if bad:
        raise ValueError(
            f"batch sizes {bad} are not multiples of K={k} with P = batch / K >= 2 "
            f"classes; choose from {[k * p for p in range(2, 9)]}, ..."
        )
    too_small = [m for m in memory_sizes if m < max(batch_sizes)]
    if too_small:
        raise ValueError(
            f"memory sizes {too_small} are smaller than the largest batch size "
            f"{max(batch_sizes)}: the memory must hold at least one batch."
        )
    runs = []
    for seed in seeds:
        for batch in batch_sizes:
            runs.append(AblationRun(WITHOUT_MEMORY, batch // k, k, 0, seed))
            for memory in memory_sizes:
                runs.append(AblationRun(WITH_MEMORY, batch // k, k, memory, seed))
    return runs


def _key(row: Mapping) -> tuple:
    return (
        row["condition"],
        int(row["p"]) * int(row["k"]),
        int(row["p"]),
        int(row["k"]),
        int(row["memory_size"]),
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return float(values.mean()), std


def aggregate(rows: Iterable[Mapping], metrics: Sequence[str]) -> list[dict]:
    """Mean and standard deviation over seeds of each condition.

    Args:
        rows: one mapping per run with keys `condition`, `p`, `k`, `memory_size`,
            `seed` and each of `metrics` (strings, as read from a CSV, or numbers).
        metrics: the metric keys to summarise, e.g. `["recall@1", "map@r"]`.

    Returns:
        One dict per condition (without memory first, then by batch size and
        memory size): `condition`, `batch_size`, `p`, `k`, `memory_size`,
        `seeds` (the number of runs) and `<metric>_mean`, `<metric>_std` (sample
        standard deviation, ddof=1; NaN with one seed).

    Example:
    >>> rows = [dict(condition="with memory", p=4, k=4, memory_size=64, seed=s,
    ...              **{"recall@1": r}) for s, r in enumerate([0.5, 0.7])]
    >>> s = aggregate(rows, ["recall@1"])[0]
    >>> round(s["recall@1_mean"], 3), round(s["recall@1_std"], 4), s["seeds"]
    (0.6, 0.1414, 2)
    """
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)
    summary = []
    for key in sorted(groups, key=lambda c: (c[1], _CONDITIONS.index(c[0]), c[4])):
        condition, batch, p, k, memory = key
        entry = dict(
            condition=condition,
            batch_size=batch,
            p=p,
            k=k,
            memory_size=memory,
            seeds=len(groups[key]),
        )
        for metric in metrics:
            mean, std = _mean_std([float(r[metric]) for r in groups[key]])
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean, std
        summary.append(entry)
    return summary


def memory_gains(rows: Iterable[Mapping], metrics: Sequence[str]) -> list[dict]:
    """The gain of each memory condition over no memory, paired by seed.

    Args:
        rows: as for `aggregate`.
        metrics: the metric keys.

    Returns:
        One dict per (batch size, memory size) that has seeds in both conditions:
        `batch_size`, `memory_size`, `seeds` (the paired seeds) and per metric
        `<metric>_gain` (mean of with - without over the paired seeds),
        `<metric>_gain_std` (their sample standard deviation), `<metric>_wins`
        (seeds where the memory scored strictly higher) and
        `<metric>_clear` (the mean gain exceeds twice the larger standard
        deviation of the two conditions, and the memory won every seed).

    Example:
    >>> rows = [dict(condition=c, p=4, k=4, memory_size=m, seed=s, **{"m": v})
    ...         for c, m, s, v in [("without memory", 0, 0, 0.5),
    ...                            ("without memory", 0, 1, 0.6),
    ...                            ("with memory", 64, 0, 0.7),
    ...                            ("with memory", 64, 1, 0.9)]]
    >>> g = memory_gains(rows, ["m"])[0]
    >>> round(g["m_gain"], 3), g["m_wins"], g["seeds"]
    (0.25, 2, 2)
    """
    rows = list(rows)
    without = {
        (int(r["p"]) * int(r["k"]), int(r["seed"])): r
        for r in rows
        if r["condition"] == WITHOUT_MEMORY
    }
    paired: dict[tuple[int, int], list[tuple[Mapping, Mapping]]] = {}
    for row in rows:
        if row["condition"] != WITH_MEMORY:
            continue
        batch = int(row["p"]) * int(row["k"])
        base = without.get((batch, int(row["seed"])))
        if base is not None:
            paired.setdefault((batch, int(row["memory_size"])), []).append((row, base))
    gains = []
    for (batch, memory), pairs in sorted(paired.items()):
        entry = dict(batch_size=batch, memory_size=memory, seeds=len(pairs))
        for metric in metrics:
            with_values = [float(w[metric]) for w, _ in pairs]
            without_values = [float(b[metric]) for _, b in pairs]
            diff = np.subtract(with_values, without_values)
            mean, std = _mean_std(diff)
            spread = max(_mean_std(with_values)[1], _mean_std(without_values)[1])
            entry[f"{metric}_gain"] = mean
            entry[f"{metric}_gain_std"] = std
            entry[f"{metric}_wins"] = int((diff > 0).sum())
            entry[f"{metric}_clear"] = bool(
                len(pairs) > 1
                and entry[f"{metric}_wins"] == len(pairs)
                and mean > 2 * spread
            )
        gains.append(entry)
    return gains


def collapsed_runs(rows: Iterable[Mapping]) -> list[Mapping]:
    """The runs whose final Recall@1 fell below the untrained network's.

    Training that ends below its own starting point has destroyed the embedding
    (a collapse: see the `neg_similarity` the train step logs), not merely
    learned less.

    Args:
        rows: as for `aggregate`; rows without `UNTRAINED_RECALL` or
            `recall@1` are never marked.

    Returns:
        The collapsed rows, in their order.

    Example:
    >>> rows = [{"recall@1": 0.28, UNTRAINED_RECALL: 0.41},
    ...         {"recall@1": 0.90, UNTRAINED_RECALL: 0.41}]
    >>> len(collapsed_runs(rows))
    1
    """
    return [
        row
        for row in rows
        if row.get(UNTRAINED_RECALL) not in (None, "")
        and "recall@1" in row
        and float(row["recall@1"]) < float(row[UNTRAINED_RECALL])
    ]


def _pm(mean: float, std: float, digits: int) -> str:
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def markdown_report(
    rows: Iterable[Mapping],
    metrics: Sequence[str],
    gain_metrics: Sequence[str] | None = None,
    digits: int = 4,
) -> str:
    """The ablation as Markdown: conditions (mean +- std) and the memory's gains.

    Args:
        rows: as for `aggregate`; rows may also hold `train_seconds` and
            `steps_per_second`, whose means are shown.
        metrics: the metric columns, e.g. `["recall@1", "map@r"]`.
        gain_metrics: the metrics of the gain table (default: `metrics`).
        digits: decimals of the metrics.

    Returns:
        Two Markdown tables as one string; when some rows hold
        `UNTRAINED_RECALL`, the first table has a `collapsed` column (runs
        whose final Recall@1 fell below the untrained network's, out of the
        seeds), and the collapsed runs are listed by name.

    Example:
    >>> rows = [dict(condition="without memory", p=4, k=4, memory_size=0, seed=0,
    ...              **{"recall@1": 0.5})]
    >>> print(markdown_report(rows, ["recall@1"]).splitlines()[2])
    | 16 (4 x 4) | without memory | - | 1 | 0.5000 |
    """
    rows = list(rows)
    timed = all("train_seconds" in r and "steps_per_second" in r for r in rows)
    checked = any(r.get(UNTRAINED_RECALL) not in (None, "") for r in rows)
    collapsed = collapsed_runs(rows)
    header = ["batch (P x K)", "memory", "M", "seeds", *metrics]
    if timed:
        header += ["train s", "steps/s"]
    if checked:
        header += ["collapsed"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + " |",
    ]
    by_key: dict[tuple, list[Mapping]] = {}
    for row in rows:
        by_key.setdefault(_key(row), []).append(row)
    for entry in aggregate(rows, metrics):
        cells = [
            f"{entry['batch_size']} ({entry['p']} x {entry['k']})",
            entry["condition"],
            str(entry["memory_size"]) if entry["memory_size"] else "-",
            str(entry["seeds"]),
        ]
        cells += [_pm(entry[f"{m}_mean"], entry[f"{m}_std"], digits) for m in metrics]
        if timed:
            group = by_key[_key(entry)]
            seconds = np.mean([float(r["train_seconds"]) for r in group])
            speed = np.mean([float(r["steps_per_second"]) for r in group])
            cells += [f"{seconds:.0f}", f"{speed:.1f}"]
        if checked:
            group = by_key[_key(entry)]
            count = sum(any(r is c for c in collapsed) for r in group)
            cells.append(f"**{count}**/{len(group)}" if count else f"0/{len(group)}")
        lines.append("| " + " | ".join(cells) + " |")
    if collapsed:
        lines += [
            "",
            "**Collapsed** (final R@1 below the untrained network's): "
            + "; ".join(
                f"{r.get('run', _key(r))} ({float(r['recall@1']):.4f} < "
                f"{float(r[UNTRAINED_RECALL]):.4f})"
                for r in collapsed
            ),
        ]
    gain_metrics = list(metrics if gain_metrics is None else gain_metrics)
    gains = memory_gains(rows, gain_metrics)
    if gains:
        lines += [
            "",
            "Gain of the memory (with - without, paired by seed; mean +- std; "
            "wins = seeds where the memory scored higher; clear = won every seed "
            "and the mean gain exceeds twice the larger std of the two "
            "conditions):",
            "",
            "| batch | M | seeds | "
            + " | ".join(f"{m} gain | wins | clear" for m in gain_metrics)
            + " |",
            "| ---: | ---: | ---: | "
            + " | ".join(["---: | ---: | ---"] * len(gain_metrics))
            + " |",
        ]
        for gain in gains:
            cells = [str(gain["batch_size"]), str(gain["memory_size"])]
            cells.append(str(gain["seeds"]))
            for m in gain_metrics:
                cells += [
                    _pm(gain[f"{m}_gain"], gain[f"{m}_gain_std"], digits),
                    f"{gain[f'{m}_wins']}/{gain['seeds']}",
                    "yes" if gain[f"{m}_clear"] else "no",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
