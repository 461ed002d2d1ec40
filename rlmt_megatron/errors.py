"""Exceptions users see. Each names the file, field or constraint that is wrong."""


class RLMTError(Exception):
    """Base class: an error in the user's input or setup, reported without a deep traceback."""


class LayoutError(RLMTError, ValueError):
    """A parallel layout that cannot work for this world size or model shape."""


class CheckpointError(RLMTError, ValueError):
    """A missing, corrupt or mismatched checkpoint file."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint marked complete whose files are missing or unreadable (a disk or storage
    fault after the save), as opposed to one that does not fit the job (layout, schedule)."""


class UnsupportedArchitectureError(RLMTError, ValueError):
    """An HF config whose architecture has no mapping table here."""


class InputFileError(RLMTError, ValueError):
    """A bad row or field in a user-supplied data file."""
