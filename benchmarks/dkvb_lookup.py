"""DKVB lookup throughput at the official sizes: our chunked nearest-key search against a naive cdist + argmin.

A ``KeyValueBottleneck`` with C = 256 codebooks x P = 4096 keys of dim k = 14 over d = 512 features (CLIP ViT-B/32),
100 classes. Timed, in samples/s, on the same queries, side by side:

- naive: ``torch.cdist`` of every query against every key of every codebook at once, then ``argmin`` — it holds a
  B x C x P distance tensor (1 GiB of float32 at B = 256);
- ours: ``KeyValueBottleneck.nearest``, the same squared distances in chunks of codebooks (at most 2^24 distances,
  64 MiB, at once);
- ours + fetch: the whole forward (split, lookup, value gather, mean over codebooks).

Both searches must pick the same keys (checked; a distance tie could differ, none occurs with random data).

    python benchmarks/dkvb_lookup.py [--batch 256] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from _machine import machine

from cil.strategies.dkvb import KeyValueBottleneck


def timed(fn, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    kvb = KeyValueBottleneck(args.features, 256, 4096, 14, num_classes=100).to(args.device).eval()
    kvb.counter.fill_(1)  # every key usable: the lookup cost does not depend on which were trained
    z = torch.randn(args.batch, args.features, device=args.device)
    x = kvb.split(z)

    def naive():
        return torch.cdist(x.transpose(0, 1), kvb.keys).argmin(-1).T  # (C, B, P) distances at once

    ours = kvb.nearest(x)
    assert torch.equal(ours, naive()), "the chunked search picked other keys"
    rows = [
        ("naive cdist + argmin", timed(naive, args.repeats, args.device), 4 * args.batch * 256 * 4096),
        ("ours (chunked)", timed(lambda: kvb.nearest(x), args.repeats, args.device), 4 * kvb.chunk_elements),
        ("ours + fetch + decode", timed(lambda: kvb(z), args.repeats, args.device), 4 * kvb.chunk_elements),
    ]
    print(f"# {machine()}, device {args.device}")
    print(f"# C=256, P=4096, k=14, d={args.features}, 100 classes, batch {args.batch}")
    print(f"{'search':<24}{'samples/s':>12}{'vs naive':>10}{'distance buffer':>18}")
    base = rows[0][1]
    for name, seconds, memory in rows:
        print(f"{name:<24}{args.batch / seconds:>12.0f}{base / seconds:>10.2f}{memory / 2**20:>15.0f} MiB")


if __name__ == "__main__":
    main()
