"""Luigi tasks of the distillation pipeline: ``luigi --module tasks TrainStudent``."""

from tasks.stages import (
    BuildLabels,
    EvaluateStudent,
    FineTuneTeacher,
    FitStudent,
    MineHardNegatives,
    PrepareData,
    ScoreShard,
    ScoreWithTeacher,
    TrainStudent,
)

__all__ = [
    "PrepareData",
    "MineHardNegatives",
    "FineTuneTeacher",
    "ScoreShard",
    "ScoreWithTeacher",
    "BuildLabels",
    "FitStudent",
    "EvaluateStudent",
    "TrainStudent",
]
