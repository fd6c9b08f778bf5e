"""Luigi tasks of the distillation pipeline: ``luigi --module tasks TrainStudent``."""

from luigi.tools.range import RangeDaily

from tasks.retrain import RetrainStudent
from tasks.stages import (
    BuildLabels,
    BuildMultilingualLabels,
    EvaluateMultilingualStudent,
    EvaluateStudent,
    FineTuneTeacher,
    FitMultilingualStudent,
    FitStudent,
    MineHardNegatives,
    PrepareData,
    ScoreShard,
    ScoreWithTeacher,
    TrainMultilingualStudent,
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
    "BuildMultilingualLabels",
    "FitMultilingualStudent",
    "EvaluateMultilingualStudent",
    "TrainMultilingualStudent",
    "RetrainStudent",
    "RangeDaily",
]
