"""Errors a user can cause. The CLI prints them as one line and exits non-zero, never a traceback."""


class SftlabError(Exception):
    """Base for user-caused errors: bad config, bad data, bad request. `str()` is the whole message."""

    exit_code = 2


class ConfigError(SftlabError):
    """A config key is unknown, mistyped or inconsistent. Message names the key and the fix."""


class DataError(SftlabError):
    """A data file or row is unusable. Message names file:line (or the column) and the fix."""


class RunDirError(SftlabError):
    """A run directory is missing, incomplete, or would be overwritten."""


class TrainingError(SftlabError):
    """The run cannot go on (non-finite loss/gradients K steps in a row, out of memory at a micro-batch of one).
    The last complete checkpoint stays resumable; the message says what to change."""


class ExportError(SftlabError):
    """An export cannot be made as asked (format refused for this run, parity check failed, --out not empty).
    The message names what works instead."""
