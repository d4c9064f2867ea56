"""The methods of combining scales, one row each: which scales a method trains on, which it is
validated at after every epoch, whether it predicts attention over scales, and which scale sets it
can predict at. Config validation, the model, the trainer, evaluation and the served model all read
this table, so a rule of a method is written once.

    single        one scale (1.0)                              trains at 1.0; predicts at 1.0 only
    avgpool       the mean of every scale's logits             trains at 1.0; any set with 1.0
    maxpool       the per-pixel max of every scale's logits    trains at 1.0; any set with 1.0
    explicit      softmax attention over its training scales   (Chen et al. 2016) its training set only
    hierarchical  attention between adjacent scales            (Tao et al. 2020) any set with 1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    trains_on_several_scales: bool  # else on [1.0] only, whatever the evaluation uses
    training_needs_one: bool  # its training scales include 1.0 (the output is at the 1.0 resolution)
    attention: bool  # predicts attention over scales: its maps are evaluated and drawn
    predicts_at: Literal["1.0 only", "its training scales", "any set with 1.0"]


METHOD_TABLE: dict[str, Method] = {
    "single": Method(trains_on_several_scales=False, training_needs_one=True, attention=False,
                     predicts_at="1.0 only"),
    "avgpool": Method(trains_on_several_scales=False, training_needs_one=True, attention=False,
                      predicts_at="any set with 1.0"),
    "maxpool": Method(trains_on_several_scales=False, training_needs_one=True, attention=False,
                      predicts_at="any set with 1.0"),
    "explicit": Method(trains_on_several_scales=True, training_needs_one=False, attention=True,
                       predicts_at="its training scales"),
    "hierarchical": Method(trains_on_several_scales=True, training_needs_one=True, attention=True,
                           predicts_at="any set with 1.0"),
}


def train_scales_problem(method: str, train_scales: list[float]) -> str | None:
    """Why `method` cannot train on `train_scales` (None if it can)."""
    rules = METHOD_TABLE[method]
    if not rules.trains_on_several_scales and train_scales != [1.0]:
        return f"method '{method}' trains at scale 1.0 only, set model.train_scales to [1.0]"
    if rules.trains_on_several_scales and rules.training_needs_one and (1.0 not in train_scales
                                                                        or len(train_scales) < 2):
        return f"{method} trains on at least two scales including 1.0"
    if rules.trains_on_several_scales and len(train_scales) < 2:
        return f"{method} needs at least two scales"
    return None


def validation_scales(method: str, train_scales: list[float]) -> list[float]:
    """The scales of the per-epoch validation (and the served model's default): what it trains on."""
    return list(train_scales) if METHOD_TABLE[method].trains_on_several_scales else [1.0]


def has_attention(method: str) -> bool:
    return METHOD_TABLE[method].attention


def eval_scales_problem(method: str, train_scales: list[float], scales: list[float]) -> str | None:
    """Why `method`, trained on `train_scales`, cannot predict at `scales` (None if it can)."""
    predicts_at = METHOD_TABLE[method].predicts_at
    if predicts_at == "1.0 only" and scales != [1.0]:
        return f"method '{method}' predicts at scale 1.0 only; use avgpool/maxpool/hierarchical for several scales"
    if predicts_at == "its training scales" and scales != list(train_scales):
        return f"method '{method}' evaluates on its training scales {list(train_scales)} only"
    if predicts_at == "any set with 1.0" and 1.0 not in scales:
        return f"method '{method}' needs 1.0 in every scale set (the output is at the 1.0 resolution)"
    return None
