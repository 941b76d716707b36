"""Streams: one file per family; importing this package registers them all.

Builders have the signature ``builder(cfg: StreamConfig, make_transforms) -> streams.common.Stream`` where
``make_transforms(crop_pct=None)`` returns the backbone's :class:`cil.backbones.Transforms`.
"""

from streams import digits, fewshot, mtil, vision  # noqa: F401  (registration)
from streams.common import Stream, build_stream, make_benchmark

__all__ = ["Stream", "build_stream", "make_benchmark", "create_stream"]


def create_stream(cfg, make_transforms) -> Stream:
    """The stream the ``stream`` group of a validated config describes."""
    from cil.registry import stream_builder

    return stream_builder(cfg.name)(cfg, make_transforms)
