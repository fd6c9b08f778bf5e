"""Luigi tasks of the distillation pipeline: ``luigi --module tasks TrainStudent``."""

import os

# Ask NVML, not the CUDA runtime, whether there is a GPU: the scheduling process then holds no
# CUDA state, and luigi workers forked from it (--workers N) can each use the GPU.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

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
