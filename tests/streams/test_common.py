"""cil.streams.common: images of every PIL mode read as the RGB they show."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cil.streams.common import read_rgb


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1).astype(np.uint8)


RAMP = np.arange(16, dtype=np.uint16).reshape(4, 4)  # 0 .. 15


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("L", lambda: Image.fromarray((RAMP * 17).astype(np.uint8)), _grey(RAMP * 17)),
        ("I;16", lambda: Image.fromarray((RAMP * 4369).astype(np.uint16)), _grey(RAMP * 17)),  # 65535 = 15 * 4369
        ("1", lambda: Image.fromarray(RAMP >= 8), _grey((RAMP >= 8) * 255)),
        (
            "RGBA",
            lambda: Image.fromarray(np.dstack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30, 0)])),
            np.dstack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30)]),  # alpha dropped, as PIL's own convert
        ),
        (
            "P",
            lambda: _palette(transparent=True),
            np.dstack([np.full((4, 4), v, np.uint8) for v in (200, 100, 50)]),
        ),
        (
            "CMYK",
            lambda: Image.fromarray(np.dstack([np.full((4, 4), v, np.uint8) for v in (0, 255, 255, 0)]), mode="CMYK"),
            np.dstack([np.full((4, 4), v, np.uint8) for v in (255, 0, 0)]),  # no magenta-yellow ink: red
        ),
    ],
    ids=["grey", "16-bit grey", "1-bit", "RGBA", "palette with transparency", "CMYK"],
)
def test_every_mode_reads_as_the_rgb_it_shows(tmp_path, mode, make, expected):
    image = make()
    assert image.mode == mode
    path = tmp_path / ("image.tiff" if mode == "CMYK" else "image.png")
    image.save(path)
    reread = Image.open(path)
    assert reread.mode == mode  # the file holds that mode (a 16-bit PNG stays 16-bit)
    got = read_rgb(path)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), expected)


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    if transparent:
        image.info["transparency"] = 0
    return image


def test_a_16_bit_png_is_not_saturated_as_pils_own_conversion_is(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "mid.png")
    assert np.asarray(Image.open(tmp_path / "mid.png").convert("RGB")).max() == 255  # PIL clips: white
    assert np.asarray(read_rgb(tmp_path / "mid.png")).max() == 128  # half the range: mid grey
