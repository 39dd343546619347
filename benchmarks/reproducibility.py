r"""Runs scripts/train.py several times and compares the printed metrics.

  python benchmarks/reproducibility.py                       # smoke config, seconds
  python benchmarks/reproducibility.py --flagfile configs/quickstart.flags \
      --variants default,default,intra_op_1

Each variant is one run of `scripts/train.py --flagfile ... --workdir <tmp>` in a
fresh process, with its environment:

- `default`: TensorFlow's own thread pools (one thread per core);
- `intra_op_1`: `TF_NUM_INTRAOP_THREADS=1` (reductions split differently);
- `onednn_off`: `TF_ENABLE_ONEDNN_OPTS=0` (Eigen kernels instead of oneDNN).

It prints each run's final metrics (`retrieval.json`, "after"), and for each run
the largest absolute difference from the first run: 0 means bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "default": {},
    "intra_op_1": {"TF_NUM_INTRAOP_THREADS": "1"},
    "onednn_off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
}


def run_once(flagfile: str, variant: str, workdir: str, extra: list[str]) -> dict:
    """One training run in a fresh process; returns its final metrics."""
    env = {**os.environ, **VARIANTS[variant]}
    command = [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        f"--flagfile={flagfile}",
        f"--workdir={workdir}",
        "--verbose=0",
        *extra,
    ]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "retrieval.json")) as f:
        return json.load(f)["after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flagfile", default="configs/smoke.flags")
    parser.add_argument("--variants", default="default,default,intra_op_1")
    parser.add_argument("extra", nargs="*", help="more flags for train.py")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(variants):
            workdir = os.path.join(tmp, f"run{i}")
            print(f"run {i} ({variant}) ...", flush=True)
            results.append(run_once(args.flagfile, variant, workdir, args.extra))
    keys = list(results[0])
    print(f"\n{args.flagfile}, final metrics per run:")
    print(f"{'run':>18} " + " ".join(f"{k:>11}" for k in keys) + "   max |diff|")
    for i, (variant, metrics) in enumerate(zip(variants, results)):
        diff = max(abs(metrics[k] - results[0][k]) for k in keys)
        values = " ".join(f"{metrics[k]:11.6f}" for k in keys)
        print(f"{f'{i} {variant}':>18} {values}   {diff:.2e}")


if __name__ == "__main__":
    main()
