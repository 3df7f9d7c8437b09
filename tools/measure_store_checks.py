"""Cost of the row checksums: read a 1000-image decoded-image store with and without its checks.

Usage: python tools/measure_store_checks.py [--size 224] [--rows 1000]. Prints the seconds of a
checked read (`RowStore.read`: pread + CRC-32 of every row), of the bare pread, and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from fewclip.stores import RowStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pixels = np.random.default_rng(0).integers(0, 256, (args.rows, args.size, args.size, 3))
    pixels = pixels.astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        store = RowStore(folder, "measure", args.rows, np.uint8)
        store.fill([np.arange(args.rows)], lambda rows: (pixels[rows], np.ones(len(rows), bool)))
        rows = np.arange(args.rows)
        layout = store._layout
        best = {"checked": float("inf"), "bare": float("inf")}
        for _ in range(args.repeats):  # best of n: the page cache is warm after the first
            started = time.perf_counter()
            assert np.array_equal(store.read(rows), pixels)
            best["checked"] = min(best["checked"], time.perf_counter() - started)
            started = time.perf_counter()
            store._pread("data.npy", rows, layout[0], store.dtype, layout[1])
            best["bare"] = min(best["bare"], time.perf_counter() - started)
    print(
        f"{args.rows} rows of {args.size}x{args.size}x3: checked read {best['checked']:.3f} s, "
        f"bare pread {best['bare']:.3f} s, ratio {best['checked'] / best['bare']:.2f}"
    )


if __name__ == "__main__":
    main()
