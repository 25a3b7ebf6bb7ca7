"""Errors a user can act on. The CLI prints their message alone (no traceback unless --debug)."""


class SemisegError(Exception):
    """Base class: the message is one sentence naming what is wrong and how to fix it."""


class ConfigError(SemisegError):
    """A bad flag, option or name."""


class DataError(SemisegError):
    """A bad file, split or label."""


class CheckpointError(SemisegError):
    """A checkpoint that does not fit the run."""


class TrainingError(SemisegError):
    """Training cannot go on (non-finite loss, unwritable output...)."""
