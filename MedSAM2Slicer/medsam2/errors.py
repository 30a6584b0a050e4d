"""Exceptions raised by the engine."""

from __future__ import annotations


class MedSAM2Error(Exception):
    """Base class of the engine's errors."""


class CheckpointError(MedSAM2Error):
    """A checkpoint file cannot be read or does not fit the model."""


class InputError(MedSAM2Error, ValueError):
    """An image, volume or prompt is not usable; the message says what is wrong and what is expected."""


class Cancelled(MedSAM2Error):
    """A run was stopped through its cancel event; nothing partial is returned."""
