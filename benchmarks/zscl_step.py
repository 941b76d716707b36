"""ZSCL training throughput: a ZSCL step against a plain fine-tuning step of the same CLIP (the distillation overhead).

Both run ``ZSCL.training_step`` + AdamW on the same model and batch, side by side in this process, in images/s of
the task batch:

- plain: the text-prompt classifier and label-smoothed CE only (``image_loss_weight = text_loss_weight = 0``,
  ``wc_weight = 0``, no weight ensemble): continual fine-tuning of CLIP;
- zscl: the paper's MTIL setting: + a reference batch of the same size through student and frozen teacher, both
  distillation terms against the cached caption embeddings, the weight constraint, and the weight-ensemble update
  every ``--we-interval`` steps (its cost amortised as in training).

    python benchmarks/zscl_step.py                                   # CPU, tiny CLIP (cil-tiny-clip, 32x32)
    python benchmarks/zscl_step.py --model ViT-B-16 --batch 64 --device cuda   # GPU, ViT-B/16 (random weights)
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _machine import machine
from torch.utils.data import TensorDataset

from cil.backbones.clip import create_clip
from cil.module import Session
from cil.strategies.zscl import ZSCL


def build(args, distill: bool, captions: str) -> ZSCL:
    torch.manual_seed(0)
    clip = create_clip(f"open_clip:{args.model}")
    size = clip.pretrained_cfg["input_size"][-1]
    reference = TensorDataset(torch.randn(4 * args.batch, 3, size, size))
    weight = 1.0 if distill else 0.0
    strategy = ZSCL(
        clip,
        iterations=args.steps,
        image_loss_weight=weight,
        text_loss_weight=weight,
        wc_weight=weight,
        we_interval=args.we_interval if distill else 0,
        reference_images=reference,
        reference_captions=captions,
    ).to(args.device)
    names = [f"class {i}" for i in range(args.classes)]
    strategy.begin_session(
        Session(index=0, new_classes=list(range(args.classes)), seen_classes=list(range(args.classes)),
                class_names=names, session_classes=[list(range(args.classes))])
    )  # fmt: skip
    strategy.on_train_start()
    return strategy


def throughput(strategy: ZSCL, args) -> float:
    size = strategy.backbone.pretrained_cfg["input_size"][-1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
    reference = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
    strategy.reference_batch = lambda: reference  # the loader's cost is the same in both settings
    optimizer = torch.optim.AdamW(strategy.trainable(), lr=1e-5)
    strategy.caption_embeddings()  # computed once per run in training too

    def step(k: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        strategy.training_step((x, y), k).backward()
        optimizer.step()
        if strategy.hparams.we_interval and k % strategy.hparams.we_interval == 0:
            strategy.ensemble.update(strategy.backbone)

    for k in range(args.warmup):
        step(k)
    if args.device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for k in range(args.steps):
        step(k)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cil-tiny-clip", help="open_clip model name (random weights)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--captions", type=int, default=2000, help="reference captions (CC val has ~15k)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--we-interval", type=int, default=10, help="10 in CIL, 100 in MTIL")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # self.log outside a Trainer; open_clip's random-init notice
    import logging
    import tempfile

    logging.disable(logging.WARNING)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(f"a photo of thing number {i} in a place" for i in range(args.captions)))
    print(f"# {machine()}, device {args.device}")
    print(f"# {args.model}, batch {args.batch} (+{args.batch} reference), {args.classes} classes, "
          f"{args.captions} captions, WE every {args.we_interval}")  # fmt: skip
    plain = throughput(build(args, False, f.name), args)
    zscl = throughput(build(args, True, f.name), args)
    print(f"{'step':<8}{'images/s':>12}{'vs plain':>10}")
    print(f"{'plain':<8}{plain:>12.1f}{1.0:>10.2f}")
    print(f"{'zscl':<8}{zscl:>12.1f}{zscl / plain:>10.2f}")


if __name__ == "__main__":
    main()
