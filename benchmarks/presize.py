"""What resizing in-memory grey images once saves: the per-item time of the Fashion-MNIST pipeline (28 px grey to
64 px RGB, timm's Lite0 eval transform, as ``configs/base/fashion_mnist.yaml``) on the raw images and on the presized
copy, the two interleaved and repeated (median, range, process CPU time), the one-off cost of the copy, and, for
scale, Lite0's forward and training step per image at 64 px in channels_last.

    python benchmarks/presize.py [--repeats 5] [--items 2000] [--readme]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _machine import machine
from _readme import write_block
from _timing import median_range


def per_item(data, transform, items: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per item of ``transform(data[i][0])`` over the first ``items`` items."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(items):
        transform(data[i][0])
    return (time.perf_counter() - wall) / items * 1e3, (time.process_time() - cpu) / items * 1e3


def model_ms_per_image(threads: int) -> tuple[float, float]:
    """Lite0 at 64 px, channels_last: (forward, training step) ms per image, batch 64, median of 5."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 64, 64).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def forward():
        with torch.inference_mode():
            model.eval()(x)

    def step():
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    out = []
    for fn in (forward, step):
        fn()
        times = []
        for _ in range(5):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        out.append(statistics.median(times) / 64 * 1e3)
    return out[0], out[1]


def main() -> None:
    import timm

    from cil.backbones import data_transforms
    from cil.streams.common import GreyImages, presized
    from cil.streams.mnist import DEBIAN_FASHION_MNIST, find_idx_files, read_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    root = Path(DEBIAN_FASHION_MNIST)
    if (root / "t10k-images-idx3-ubyte.gz").is_file():
        test = read_split(find_idx_files(root, "FashionMNIST"), "test", 10)
        raw, source = GreyImages(test.images[: args.items], test.targets[: args.items]), "Fashion-MNIST test images"
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.items, 28, 28), dtype=np.uint8)
        raw, source = GreyImages(images, [0] * args.items), "random 28 px images (Fashion-MNIST not installed)"
    tf = data_transforms(timm.create_model("tf_efficientnet_lite0"), 64, False, crop_pct=1.0).eval
    began = time.perf_counter()
    copy = presized(raw, tf)
    copy_ms = (time.perf_counter() - began) / len(raw) * 1e3
    assert copy is not raw
    rows = {"raw": [], "presized": []}
    for _ in range(args.repeats):  # interleaved: the two sides see the same machine state
        rows["raw"].append(per_item(raw, tf, len(raw)))
        rows["presized"].append(per_item(copy, tf, len(raw)))
    forward_ms, step_ms = model_ms_per_image(threads)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    lines = [
        "| images | ms / item, wall (median, range) | CPU ms / item | share of a forward | of a training step |",
        "|---|---|---|---|---|",
    ]
    for name, values in rows.items():
        wall, cpu = med[name]
        lines.append(
            f"| {name} | {median_range((w for w, _ in values), '.4f')} | {cpu:.4f} | "
            f"{100 * wall / forward_ms:.1f}% | {100 * wall / step_ms:.1f}% |"
        )
    ratios = sorted(r[0] / p[0] for r, p in zip(rows["raw"], rows["presized"]))
    lines.append(
        f"\n{source}, {len(raw)} items x {args.repeats} interleaved repeats; raw / presized per item: "
        f"{median_range(ratios, unit='x')}; the copy costs {copy_ms:.4f} ms per "
        f"image once. Lite0 at 64 px, channels_last, batch 64: forward {forward_ms:.2f} ms, training step "
        f"{step_ms:.2f} ms per image. {machine()}."
    )
    text = "\n".join(lines)
    print(text)
    if args.readme:
        write_block("presize", text)


if __name__ == "__main__":
    main()
