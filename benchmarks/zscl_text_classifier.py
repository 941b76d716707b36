"""ZSCL's training classifier at SUN397's 397 classes: one text-tower call per class (former) against batched
calls (``cil.strategies.zscl.text_classifier``), forward and backward as in a training step, on open_clip's ViT-B-16
text tower (random weights: the cost does not depend on them). Both run here, same process, same prompts; the
classifiers are checked equal.

    python benchmarks/zscl_text_classifier.py [--classes 397] [--repeats 3] [--forward-only]

The backward pass keeps every prompt's text-tower activations alive, batched or not (a 397-class run was killed for
memory on a 24 GB machine); ``--forward-only`` times the forward calls alone, which fits any machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import machine  # noqa: E402
from cil.backbones.clip import create_clip  # noqa: E402
from cil.strategies.zscl import text_classifier  # noqa: E402


def per_class(encode_text, tokenize, names, template):
    rows = [
        F.normalize(F.normalize(encode_text(tokenize([template.format(n)])), dim=-1).mean(0), dim=-1) for n in names
    ]
    return torch.stack(rows)


def timed(build, params, repeats: int, backward: bool = True) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        for p in params:
            p.grad = None
        began = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = build()
            if backward:
                out.sum().backward()
        best = min(best, time.perf_counter() - began)
        out = out.detach()
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=397)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-only", action="store_true", help="time the forward calls only (no backward)")
    args = parser.parse_args()
    backward = not args.forward_only
    clip = create_clip("open_clip:ViT-B-16-quickgelu")
    params = [p for p in clip.parameters() if p.requires_grad]
    names, template = [f"class number {i}" for i in range(args.classes)], "a photo of a {}."
    former_s, former = timed(
        lambda: per_class(clip.encode_text, clip.tokenize, names, template), params, args.repeats, backward
    )
    ours_s, ours = timed(
        lambda: text_classifier(clip.encode_text, clip.tokenize, names, [template]), params, args.repeats, backward
    )
    torch.testing.assert_close(ours, former, rtol=1e-4, atol=1e-5)
    passes = "forward only" if args.forward_only else "forward + backward"
    print(f"{machine()}; {args.classes} classes, {passes}, best of {args.repeats}")
    print("| text classifier | seconds |\n|---|---|")
    print(f"| one call per class (former) | {former_s:.2f} |\n| batched (ours) | {ours_s:.2f} |")
    print(f"speed-up: {former_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
