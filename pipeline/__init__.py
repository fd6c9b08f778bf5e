"""Library code of the reranker distillation pipeline; no luigi import, usable and testable alone."""

from pipeline.errors import DataError, PipelineError

__all__ = ["DataError", "PipelineError"]
