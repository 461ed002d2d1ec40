"""Exceptions users see. Each names the file, field or constraint that is wrong."""


class RLMTError(Exception):
    """Base class: an error in the user's input or setup, reported without a deep traceback."""


class LayoutError(RLMTError, ValueError):
    """A parallel layout that cannot work for this world size or model shape."""


class CheckpointError(RLMTError, ValueError):
    """A missing, corrupt or mismatched checkpoint file."""


class UnsupportedArchitectureError(RLMTError, ValueError):
    """An HF config whose architecture has no mapping table here."""


class InputFileError(RLMTError, ValueError):
    """A bad row or field in a user-supplied data file."""
