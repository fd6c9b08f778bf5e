"""Luigi tasks of the distillation pipeline: ``luigi --module tasks TrainStudent``."""

import os

# Ask NVML, not the CUDA runtime, whether there is a GPU: the scheduling process then holds no
# CUDA state, and luigi workers forked from it (--workers N) can each use the GPU.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import logging

from luigi.tools.range import RangeDaily

from pipeline.errors import PipelineError

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


class OneLineErrors(logging.Filter):
    """An expected error (bad data, bad settings, a full disk: a ``PipelineError``) is logged as
    its one line, without a traceback; unexpected errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, PipelineError):
            record.msg, record.args = f"{record.getMessage()}: {error}", ()
            record.exc_info, record.exc_text = None, None
        return True


# luigi's worker logs a failed task with logger.exception on this logger.
logging.getLogger("luigi-interface").addFilter(OneLineErrors())

