"""User-facing errors: each carries a one-line message and a hint saying what to do.

The CLI prints ``error: <message> (<hint>)`` and exits non-zero; it never shows a traceback
for these. Anything that is not an AudiofxError is a bug and keeps its traceback.
"""

from __future__ import annotations


class AudiofxError(Exception):
    """An error caused by the user's input or environment, not by a bug."""

    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())  # never more than one line


class DatasetError(AudiofxError):
    """The dataset root, its metadata or its files are missing or malformed."""


class ConfigError(AudiofxError):
    """An unknown preset, option or value."""


class StoreError(AudiofxError):
    """The feature store is missing, damaged, or was written for something else."""


class TrainingError(AudiofxError):
    """Training cannot go on (a loss that is not finite): what was trained before is kept."""


class AudioSkip(Exception):
    """One clip cannot be used (empty, truncated, not audio, NaN/inf). Recorded, not fatal.

    Raised by the decoder; the extractor records ``reason`` for the clip and moves on,
    unless --strict turns skips into errors.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
