"""Errors the pipeline raises for bad input: one line that names the file, row and field."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad parameter, missing model, impossible loss/data combination)."""


class DataError(PipelineError, ValueError):
    """Bad input data, located to ``file:line`` and field."""

    def __init__(self, path, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {problem}")


class DiskFullError(PipelineError, OSError):
    """The device ran out of space while an output was written; names the output, not a temporary."""

    def __init__(self, path):
        self.path = str(path)
        super().__init__(
            f"{self.path}: no space left on the device while writing it; nothing was written under this name "
            "and finished outputs are intact: free space and rerun"
        )
