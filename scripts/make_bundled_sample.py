"""Write the small MNIST sample shipped in cvae_exp/data/bundled/ (the fallback when the Hub is unreachable).

Usage: python scripts/make_bundled_sample.py <mnist hf/ folder> [--train 10000] [--test 2000]

The input is a local copy of the Hub dataset ylecun/mnist in its Parquet layout (mnist/train-*.parquet,
mnist/test-*.parquet). The first N digits of each split are kept in their original order, their PNG bytes
copied unchanged, and written with datasets itself so the files have exactly the Hub's schema.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets

OUT = Path(__file__).resolve().parents[1] / "cvae_exp" / "data" / "bundled" / "mnist"
FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path, help="folder holding mnist/{train,test}-00000-of-00001.parquet")
    parser.add_argument("--train", type=int, default=10_000, help="how many training digits to keep")
    parser.add_argument("--test", type=int, default=2_000, help="how many test digits to keep")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: the package's)")
    args = parser.parse_args()

    full = datasets.load_dataset(str(args.hf_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        sample = full[split].select(range(n)).cast(FEATURES)
        file = args.out / f"{split}-00000-of-00001.parquet"
        sample.to_parquet(str(file))
        print(f"{file}: {n} digits, {file.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
