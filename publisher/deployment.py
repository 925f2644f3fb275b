"""Core ML deployment targets (a package's minimum OS), shared by the manifest and the compression schemes."""

from __future__ import annotations

from enum import Enum


class DeploymentTarget(str, Enum):
    iOS16 = "iOS16"
    iOS17 = "iOS17"
    iOS18 = "iOS18"
    macOS13 = "macOS13"
    macOS14 = "macOS14"
    macOS15 = "macOS15"

    @property
    def level(self) -> int:
        """The Core ML generation: iOS16 == macOS13 == 16, and so on."""
        number = int(self.value.removeprefix("iOS").removeprefix("macOS"))
        return number if self.value.startswith("iOS") else number + 3

    @property
    def pair(self) -> str:
        """Both names of the generation (`iOS17/macOS14`), for messages."""
        return f"iOS{self.level}/macOS{self.level - 3}"


def target_of_level(level: int) -> DeploymentTarget:
    return DeploymentTarget(f"iOS{level}")
