"""Errors that are the user's to fix: the CLI prints them as one red line, without a traceback."""


class UserError(Exception):
    """A bad config value, an incompatible choice, missing data: something the user can fix."""


class DataError(UserError):
    """Dataset files are missing, corrupt, or could not be downloaded."""


class ResultsError(UserError):
    """A result could not be written (disk full, no permission); what was written before is intact."""


class RunFailed(Exception):
    """Training raised: the run's summary.json records it as failed, with the traceback (`__cause__` is the
    original exception). Not the user's config to fix, so the CLI exits 1, in one line."""

    def __init__(self, folder, error: str):
        super().__init__(error)
        self.folder, self.error = folder, error
