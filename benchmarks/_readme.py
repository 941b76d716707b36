"""Rewrite a generated block of README.md: the text between ``<!-- name -->`` and ``<!-- /name -->``."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def write_block(name: str, text: str, readme: Path = README) -> None:
    block = f"<!-- {name} -->\n{text}\n<!-- /{name} -->"
    content, n = re.subn(rf"<!-- {name} -->.*?<!-- /{name} -->", lambda _: block, readme.read_text(), flags=re.S)
    if n != 1:
        raise SystemExit(f"{readme} has no <!-- {name} --> ... <!-- /{name} --> block")
    readme.write_text(content)
