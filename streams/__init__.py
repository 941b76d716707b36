"""Streams: one file per family, each registering its streams (``register_stream``) when imported; ``cil.registry``
imports a family's file the first time one of its streams is built, so listing names and checking configs need
neither torch nor Avalanche.

Builders have the signature ``builder(cfg: StreamConfig, make_transforms) -> cil.streams.common.Stream`` where
``make_transforms(crop_pct=None)`` returns the backbone's :class:`cil.backbones.Transforms`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cil.streams.common import Stream


def __getattr__(name: str):
    if name in ("Stream", "build_stream", "make_benchmark"):
        from cil.streams import common

        return getattr(common, name)
    raise AttributeError(f"module 'streams' has no attribute {name!r}")


__all__ = ["Stream", "build_stream", "make_benchmark", "create_stream", "online_stream", "unlabelled_data"]


def create_stream(cfg, make_transforms) -> Stream:
    """The stream the ``stream`` group of a validated config describes (collapsed to one session if ``online``)."""
    from cil.registry import stream_builder

    stream = stream_builder(cfg.name)(cfg, make_transforms)
    return online_stream(stream, cfg.seed) if cfg.online else stream


def online_stream(stream: Stream, seed: int) -> Stream:
    """The whole stream as one session: each session's training data shuffled (seeded), the sessions end to end in
    their order; the session loop then reads it in this order (no boundaries, one sequence of mini-batches)."""
    import numpy as np

    def chain(parts):
        out = parts[0]
        for part in parts[1:]:
            out = out.concat(part)
        return out

    shuffled = [
        d.subset(np.random.RandomState([seed, j]).permutation(len(d)).tolist()) for j, d in enumerate(stream.train_data)
    ]
    train, stats, test = chain(shuffled), chain(stream.stats_data), chain(stream.eval_data)
    from avalanche.benchmarks import benchmark_from_datasets, with_classes_timeline

    from cil.streams.common import Stream

    return Stream(
        name=stream.name,
        benchmark=with_classes_timeline(benchmark_from_datasets(train=[train], test=[test])),
        classes_per_session=[[c for s in stream.classes_per_session for c in s]],
        class_names=stream.class_names,
        original_class_ids=stream.original_class_ids,
        train_data=[train],
        eval_data=[test],
        stats_data=[stats],
    )


def unlabelled_data(cfg, make_transforms, stream: Stream):
    """The data set ``stream.unlabelled`` names (evaluation transforms): another registered stream's training
    images, or ``self`` for this stream's; None when not set. Items keep their labels; users must not read them."""
    from omegaconf import OmegaConf
    from torch.utils.data import ConcatDataset

    name = cfg.unlabelled
    if name is None:
        return None
    if name == "self":
        return ConcatDataset(stream.stats_data)
    other = OmegaConf.to_container(cfg, resolve=True)
    other.update(
        name=name, data_root=cfg.unlabelled_root or cfg.data_root, split="B0-Inc1", class_order=None, shots=None,
        base_shots=None, index_dir=None, datasets=None, unlabelled=None, online=False,
    )  # fmt: skip
    return ConcatDataset(create_stream(OmegaConf.create(other), make_transforms).stats_data)
