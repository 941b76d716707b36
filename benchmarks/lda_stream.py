"""StreamingLDA vs scikit-learn refitting on everything seen so far, over a class-incremental stream.

Ten sessions of ten new classes each (``--per-class`` samples per class) of d = 768 features, the output of one
fixed random projection (1024 -> 768, tanh) of Gaussian class clusters. Per session we time:

- ours: ``StreamingLDA.update`` on the new session's features only, then the (cached) solve;
- baseline: ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s).fit`` on every feature seen so far, which is
  what an LDA head without streaming statistics must do (the official FSA code recomputes from all features).

Both are the same classifier (``mode="sklearn"``): the script checks their decision functions agree before it
prints the two time curves and the ratio at session 10.

    python benchmarks/lda_stream.py [--per-class 500] [--dim 768] [--sessions 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _machine import machine
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from cil.layers.lda import StreamingLDA


def session_features(rng, projection, centres, classes, per_class):
    raw = np.concatenate([rng.normal(size=(per_class, centres.shape[1])) + centres[c] for c in classes])
    return np.tanh(raw @ projection), np.repeat(classes, per_class)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--classes-per-session", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shrinkage", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    raw_dim = 1024
    projection = rng.normal(size=(raw_dim, args.dim)) / np.sqrt(raw_dim)  # the fixed random projection
    n_classes = args.sessions * args.classes_per_session
    centres = rng.normal(scale=0.5, size=(n_classes, raw_dim))

    head = StreamingLDA(args.dim, mode="sklearn", shrinkage=args.shrinkage)
    seen_x, seen_y, rows = [], [], []
    print(machine())
    print(f"{args.sessions} sessions x {args.classes_per_session} classes x {args.per_class} samples, d={args.dim}\n")
    print(f"{'session':>7} {'seen':>7} {'ours (s)':>9} {'sklearn refit (s)':>18} {'speed-up':>9}")
    for s in range(args.sessions):
        classes = np.arange(s * args.classes_per_session, (s + 1) * args.classes_per_session)
        x, y = session_features(rng, projection, centres, classes, args.per_class)
        seen_x.append(x)
        seen_y.append(y)

        began = time.perf_counter()
        head.update(torch.from_numpy(x), torch.from_numpy(y))
        head.solution()
        ours = time.perf_counter() - began

        all_x, all_y = np.concatenate(seen_x), np.concatenate(seen_y)
        began = time.perf_counter()
        reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=args.shrinkage).fit(all_x, all_y)
        theirs = time.perf_counter() - began
        rows.append((s + 1, len(all_y), ours, theirs))
        print(f"{s + 1:>7} {len(all_y):>7} {ours:>9.3f} {theirs:>18.3f} {theirs / ours:>8.1f}x", flush=True)

    probe = np.concatenate(seen_x)[:: max(1, len(all_y) // 2000)]
    diff = np.abs(head.logits(torch.from_numpy(probe)).numpy() - reference.decision_function(probe)).max()
    print(f"\nmax |logit difference| vs scikit-learn after session {args.sessions}: {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("the two heads disagree: the timing comparison is void")
    total_ours, total_theirs = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(
        f"session {args.sessions}: ours {rows[-1][2]:.3f} s, scikit-learn {rows[-1][3]:.3f} s, "
        f"ratio {rows[-1][3] / rows[-1][2]:.1f}x; all sessions: {total_theirs / total_ours:.1f}x"
    )


if __name__ == "__main__":
    main()
