"""ZSCL's reference image folder at ImageNet scale: listing a tree of 1.28 M files, before and after.

The baseline is the former listing (``os.walk`` + a sorted list of ``Path`` objects); ours is
``cil.streams.reference.ImageFiles`` (one ``os.scandir`` walk, relative paths in one numpy byte array). Both run
here, in this process, on the same tree; the memory column is what the list itself holds (``tracemalloc``), which every
loader worker otherwise copies as it touches the objects' reference counts.

    python benchmarks/reference_folder.py /tmp/imagenet_tree    # a tree of empty files, e.g. 1000 x 1281
    python benchmarks/reference_folder.py --make /tmp/imagenet_tree --files 1281167
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc
from pathlib import Path

from cil.streams.reference import IMAGE_SUFFIXES, ImageFiles


def make_tree(root: Path, files: int, per_folder: int = 1281) -> None:
    for d in range(-(-files // per_folder)):
        folder = root / f"n{d:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_folder, files - d * per_folder)):
            (folder / f"n{d:08d}_{i}.JPEG").touch()


def former(root: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, names in os.walk(root) for f in names if f.lower().endswith(IMAGE_SUFFIXES))


def measure(build) -> tuple[float, float, object]:
    gc.collect()
    tracemalloc.start()
    began = time.perf_counter()
    result = build()
    seconds = time.perf_counter() - began
    held = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    return seconds, held, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--make", action="store_true", help="create the tree first")
    parser.add_argument("--files", type=int, default=1_281_167)
    args = parser.parse_args()
    if args.make:
        make_tree(args.root, args.files)
    base_s, base_mb, paths = measure(lambda: former(args.root))
    ours_s, ours_mb, files = measure(lambda: ImageFiles(args.root))
    assert [files.path(i) for i in range(0, len(files), 9973)] == paths[::9973]  # the same files, same order
    print(f"{len(paths):,} files")
    print("| listing | seconds | MiB held |\n|---|---|---|")
    print(f"| os.walk + sorted Paths (former) | {base_s:.1f} | {base_mb:.0f} |")
    print(f"| ImageFiles (scandir, byte array) | {ours_s:.1f} | {ours_mb:.0f} |")
    print(f"ratio: {base_s / ours_s:.2f}x faster, {base_mb / ours_mb:.1f}x less memory")


if __name__ == "__main__":
    main()
