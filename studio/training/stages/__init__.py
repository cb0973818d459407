"""Training stages: one module per way of training an adapter, behind the Stage protocol (base.py)."""

from __future__ import annotations

from studio.training.stages.base import Stage, StageData, StageName
from studio.training.stages.preference import DPOStage, KTOStage, ORPOStage
from studio.training.stages.sft import SupervisedStage

DEFAULT_STAGE = StageName.SFT  # a run config written before stages existed names none: it is SFT

STAGES: dict[StageName, Stage] = {
    StageName.SFT: SupervisedStage(),
    StageName.DPO: DPOStage(),
    StageName.KTO: KTOStage(),
    StageName.ORPO: ORPOStage(),
}


def get_stage(name: StageName | str = DEFAULT_STAGE) -> Stage:
    """The stage called `name`; a ValueError naming the known ones otherwise."""
    try:
        return STAGES[StageName(name)]
    except ValueError:
        known = ", ".join(s.value for s in STAGES)
        raise ValueError(f"Unknown training stage '{name}'. Known: {known}.") from None


__all__ = ["DEFAULT_STAGE", "STAGES", "Stage", "StageData", "StageName", "get_stage"]
