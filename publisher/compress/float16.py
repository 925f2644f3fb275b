"""`precision: {type: float16}`: the converted packages as they are (no compression step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from publisher.compress.scheme import CompressContext, CompressionScheme, CompressionSettings


class Float16Settings(CompressionSettings):
    type: Literal["float16"]


class Float16(CompressionScheme):
    name = "float16"
    settings_model = Float16Settings

    def compresses(self, settings: CompressionSettings, component: str) -> bool:
        return False

    def label(self, settings: CompressionSettings) -> str:
        return "float16"

    def apply(self, source: Path, output: Path, settings: CompressionSettings, context: CompressContext
              ) -> dict[str, Any]:
        raise AssertionError("float16 has no compress step")  # compresses() is False: the plan adds none


SCHEME = Float16()
