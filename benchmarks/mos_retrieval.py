"""MOS inference throughput: the batched self-refined retrieval against a plain forward of the same backbone.

A MOS strategy after ``--sessions`` sessions (random adapters, head and prototypes: the cost of retrieval does not
depend on what was learnt, only on how many adapters a batch needs), on a timm ViT. Timed, in images/s:

- plain: one backbone forward + linear head (what a single-adapter or frozen model costs);
- ours: ``MOS.forward`` — the adapter-0 first guess, then only the adapters the batch's samples move to, each run
  once per batch (:class:`cil.layers.retrieval.SelfRefinedRetrieval`), then the ensemble;
- official: the code's evaluation — features of *every* stored adapter for every batch, then a per-sample loop of
  head evaluations (no in-place merging here, so all three give the same predictions; the script checks that).

    python benchmarks/mos_retrieval.py [--model vit_tiny_patch16_224] [--image-size 32] [--sessions 10]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _machine import machine

from cil.backbones import create_backbone
from cil.strategies.mos import MOS, ensemble


def build(args) -> MOS:
    torch.manual_seed(0)
    kwargs = {"img_size": args.image_size, **({"depth": args.depth} if args.depth else {})}
    strategy = MOS(create_backbone(args.model, **kwargs)).eval()
    with torch.no_grad():
        for task in range(args.sessions):
            seen = (task + 1) * args.classes_per_session
            for p in strategy.adapters.current.parameters():
                p.normal_(0, 0.05)
            strategy.adapters.snapshot()
            strategy.classifier.grow(seen)
            strategy.prototypes.grow(seen)
            strategy.retrieval.add_task(seen, task)
        strategy.prototypes.sums.normal_()
        strategy.prototypes.counts.fill_(1)
    return strategy


@torch.no_grad()
def official(strategy: MOS, x: torch.Tensor) -> torch.Tensor:
    """The official ``_eval_cnn`` (without its in-place merges): all adapters' features, then a per-sample loop."""
    _, z_orig = strategy.first_guess(x)
    first = strategy.retrieval.task_of(z_orig)
    features = []
    for j in range(len(strategy.adapters)):
        with strategy.adapters.use(j):
            features.append(strategy.features(x))
    rows = []
    for i in range(len(x)):
        task, count = int(first[i]), 0
        while True:
            count += 1
            z = strategy.classifier(features[task][i : i + 1])
            proposed = int(strategy.retrieval.task_of(z))
            if count >= strategy.retrieval.max_iter or proposed == task:
                break
            task = proposed
        rows.append(z)
    return ensemble(torch.cat(rows), z_orig, len(strategy.adapters))


def throughput(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=0, help="override the ViT depth (0: the model's)")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--classes-per-session", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    strategy = build(args).to(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    calls = []
    original = strategy.features

    def counted(inputs):
        calls.append(len(inputs))
        return original(inputs)

    strategy.features = counted
    with torch.no_grad():
        ours_out = strategy(x)
        forwards_per_image = sum(calls) / len(x)
        assert torch.allclose(ours_out, official(strategy, x), atol=1e-5), "ours and the official loop disagree"

    def plain(inputs):
        with torch.no_grad(), strategy.adapters.use(None):
            return F.linear(original(inputs), strategy.classifier.weight, strategy.classifier.bias)

    strategy.features = original
    rates = {}
    with torch.no_grad():
        rates["plain forward"] = throughput(plain, x, args.repeats)
        rates["MOS, batched retrieval (ours)"] = throughput(strategy, x, args.repeats)
        rates["MOS, official evaluation loop"] = throughput(lambda v: official(strategy, v), x, args.repeats)
    print(f"{args.model} at {args.image_size}px, {args.sessions} sessions, batch {args.batch}, {args.device}")
    print(f"machine: {machine()}")
    print(f"adapter forwards per image: ours {forwards_per_image:.2f}, the official loop {args.sessions + 1}\n")
    print(f"{'':34s} {'images/s':>10s} {'vs plain':>9s}")
    for name, rate in rates.items():
        print(f"{name:34s} {rate:10.1f} {rate / rates['plain forward']:8.2f}x")


if __name__ == "__main__":
    main()
