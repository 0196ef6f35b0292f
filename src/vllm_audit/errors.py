"""Exceptions, factored out to avoid import loops.

Our exception hierarchy::

    * AuditError
      x ConfigError          a configuration file or value is invalid
      x LogWriteError        records cannot be made durable (disk full, I/O error)
      x KeyFileError         a key file is missing, malformed or readable by others
      x VerificationError    a log, checkpoint or proof does not verify
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class for every error vllm-audit raises on purpose."""


class ConfigError(AuditError):
    """The configuration is invalid; the message names the file, section and key."""


class LogWriteError(AuditError):
    """Records could not be written durably."""


class KeyFileError(AuditError):
    """A key file is missing, malformed, or readable by others."""


class VerificationError(AuditError):
    """Something does not verify; the message says what and where."""
