"""The errors `hanlin data prepare` raises: each names the input, file or rule that was wrong."""

from __future__ import annotations

from hanlin.backends.base import ConfigError


class DataPrepError(ConfigError):
    """Raw data that cannot be prepared: a missing input, an unusable option, an existing OUT."""


class NoDocumentsError(DataPrepError):
    """No document survived the filters: nothing is written at OUT (the report is saved beside it)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
