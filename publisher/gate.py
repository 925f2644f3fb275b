"""The end-to-end check's settings and the publish gate over its figures (publisher.evaluate computes them; the
plan keys the check by these settings, the publish command applies the gate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EVALUATION = "evaluation.json"
SAMPLE = "sample.png"
# the end-to-end image PSNR (dB) against diffusers' float32 pipeline a variant needs to be published, by
# precision: float16 as the bar; a compressed variant's default is lower (its weights differ by design)
FLOOR_DB = {"float16": 30.0, "compressed": 15.0}
MARGIN_DB = 1.0  # how far under the published revision's figure a rebuild may fall
# the fixed prompts (each with its seed): the same for every variant, so that figures and samples compare
PROMPTS: tuple[tuple[str, int], ...] = (("a photo of an astronaut riding a horse on mars", 0),
                                        ("a red fox sitting in the snow, detailed photo", 1))


@dataclass(frozen=True)
class EvaluationSettings:
    steps: int = 10
    scheduler: str = "pndm"
    guidance: float = 7.5
    prompts: tuple[tuple[str, int], ...] = PROMPTS

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "scheduler": self.scheduler, "guidance": self.guidance,
                "prompts": [{"prompt": p, "seed": s} for p, s in self.prompts]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvaluationSettings:
        return cls(steps=int(data["steps"]), scheduler=str(data["scheduler"]), guidance=float(data["guidance"]),
                   prompts=tuple((str(p["prompt"]), int(p["seed"])) for p in data["prompts"]))


def floor_of(compressed: bool, manifest_floor: float | None) -> float:
    return manifest_floor if manifest_floor is not None else FLOOR_DB["compressed" if compressed else "float16"]


def gate_problem(variant_id: str, evaluation: dict[str, Any], floor_db: float, published: dict[str, Any] | None,
                 margin_db: float = MARGIN_DB) -> str | None:
    """Why a variant may not be published (None: it may): its end-to-end image PSNR under the floor, or more than
    the margin under the published revision's figure at the same settings."""
    figure = evaluation.get("figures", {}).get("image_psnr_db")
    if figure is None:
        return None
    if figure < floor_db:
        return f"{variant_id}: end-to-end image PSNR {figure:.1f} dB is under its floor of {floor_db:g} dB"
    recorded = published.get("figures") if published else None  # the published file: read, not trusted
    if isinstance(recorded, dict) and published and published.get("settings") == evaluation.get("settings"):
        before = recorded.get("image_psnr_db")
        if isinstance(before, int | float) and figure < before - margin_db:
            return (f"{variant_id}: end-to-end image PSNR {figure:.1f} dB regressed from the published "
                    f"{before:.1f} dB (more than {margin_db:g} dB)")
    return None
