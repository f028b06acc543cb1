"""Typed errors of the engine.

Every error says what was wrong and what to do about it; callers (nodes, the graph
runner) wrap them with the node id and input name.
"""
from __future__ import annotations


class LdmError(Exception):
    """Base class of every error raised on purpose by ldm_core."""


class ConfigError(LdmError, ValueError):
    """A model configuration is malformed (unknown key, wrong type, impossible value)."""


class CheckpointError(LdmError):
    """A weights file could not be used."""


class CheckpointFormatError(CheckpointError):
    """The file is truncated, corrupt, or not a weights file of a known format."""


class UnsafeCheckpointError(CheckpointError):
    """The file would need code execution to load (a pickle with arbitrary globals); refused."""


class UnsupportedModelError(CheckpointError):
    """The weights are readable but belong to no supported architecture."""


class WrongComponentError(CheckpointError):
    """The file holds a different component than asked for (e.g. a VAE given as a checkpoint)."""


class StateDictMismatchError(CheckpointError):
    """Strict loading failed: keys missing, unexpected, or of the wrong shape."""


class PromptError(LdmError, ValueError):
    """A prompt could not be tokenized or encoded."""


class DeviceError(LdmError):
    """A requested device or precision is not available here."""


class MemoryBudgetError(LdmError, MemoryError):
    """An allocation would not fit in the memory there is: says what it needed, what was free and
    what to do (keep weights in the file's dtype, a smaller batch, tiled decoding)."""
