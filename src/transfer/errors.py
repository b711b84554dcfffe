"""Errors a user can act on.

Every error raised for bad input, a missing dependency or a broken artifact is a
:class:`TransferError`. The CLI prints ``error: <message>`` (plus ``hint: ...``) and
exits with :attr:`TransferError.exit_code` instead of showing a traceback (``--debug``
shows it).
"""

from __future__ import annotations


class TransferError(Exception):
    """Base class: a problem the user can fix. ``hint`` says what to do.

    ``option`` names the library parameter the error is about (``"batch"``, ``"trainable"``):
    library messages describe values ("batch size must be positive (got 0)"); the CLI
    knows which flag feeds that parameter and prefixes it (``--batch: ...``).
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, option: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.option = option

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class ConfigError(TransferError):
    """An option or config value is invalid."""

    exit_code = 2


class DataError(TransferError):
    """A dataset folder is unusable (empty, one class, class without images, ...)."""


class ImageDecodeError(TransferError):
    """One image file cannot be decoded. ``path`` and ``reason`` name the file and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ModelError(TransferError):
    """A backbone / model cannot be built or loaded as asked."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights cannot be had (offline, missing file, wrong file)."""


class RunFolderError(TransferError):
    """A run folder is missing, incomplete or does not hold what was asked."""


class ExportError(TransferError):
    """Export failed."""


class VerificationError(ExportError):
    """An exported model does not match its reference within the limits."""


class BundleError(TransferError):
    """A deployment bundle is missing, incomplete, or does not match its manifest."""


class TamperedBundleError(BundleError):
    """A file of a bundle does not have the SHA-256 its manifest records."""


class OutputError(TransferError):
    """An output file or folder cannot be created or written (permissions, a file in the way)."""


class DependencyMissingError(TransferError):
    """An optional dependency is not installed; the hint gives the install command."""


class TensorRTUnavailableError(TransferError):
    """TensorRT or a CUDA device is missing. Distinct exit code so scripts can tell."""

    exit_code = 3
