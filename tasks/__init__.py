"""Luigi tasks of the distillation pipeline: ``luigi --module tasks TrainStudent``."""

import os

# Ask NVML, not the CUDA runtime, whether there is a GPU: the scheduling process then holds no
# CUDA state, and luigi workers forked from it (--workers N) can each use the GPU.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import logging

import luigi.configuration
import luigi.interface
import luigi.retcodes
import luigi.scheduler
import luigi.worker
from luigi.tools.range import RangeDaily

from pipeline.errors import PipelineError

from tasks.retrain import RetrainStudent
from tasks.stages import (
    BuildLabels,
    BuildMultilingualLabels,
    ChooseStudentDepth,
    EvaluateMultilingualStudent,
    EvaluateStudent,
    ExportOnnx,
    FineTuneTeacher,
    FitMultilingualStudent,
    FitStudent,
    MineHardNegatives,
    MultilingualPlainStudent,
    PlainStudent,
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
    "ChooseStudentDepth",
    "FitStudent",
    "EvaluateStudent",
    "ExportOnnx",
    "PlainStudent",
    "TrainStudent",
    "BuildMultilingualLabels",
    "FitMultilingualStudent",
    "MultilingualPlainStudent",
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
        elif error is None and TRACEBACK in record.getMessage():
            # A requires() or complete() that refuses its settings: luigi catches it while
            # scheduling and logs the formatted traceback inside the message ("Will not run ...
            # due to error in deps() method:\n<traceback>"), the exception itself gone.
            headline, _, trace = record.getMessage().partition("\n")
            name, colon, message = trace.rstrip().rpartition("\n")[2].partition(": ")
            if colon and name in _qualified_names(PipelineError):
                record.msg, record.args = f"{headline.rstrip(':')}: {message}", ()
        return True


TRACEBACK = "Traceback (most recent call last)"


def _qualified_names(cls: type) -> set[str]:
    """How a traceback's last line names ``cls`` and its subclasses."""
    return {f"{cls.__module__}.{cls.__qualname__}"}.union(*(_qualified_names(c) for c in cls.__subclasses__()))


# luigi's worker logs a failed task with logger.exception on this logger.
logging.getLogger("luigi-interface").addFilter(OneLineErrors())


def _shared_settings_are_not_unconsumed() -> None:
    """luigi.cfg's [DEFAULT] holds the settings the entry tasks share, and luigi applies it to
    every section, its own [core], [retcode], [worker] and [scheduler] too; ``ignore_unconsumed``
    (luigi's own list of keys a section may hold without using) stops it warning about each."""
    shared = {key.replace("-", "_") for key in luigi.configuration.get_config().defaults()}
    for config in (luigi.interface.core, luigi.retcodes.retcode, luigi.worker.worker, luigi.scheduler.scheduler):
        config.ignore_unconsumed = set(getattr(config, "ignore_unconsumed", ())) | shared


_shared_settings_are_not_unconsumed()
