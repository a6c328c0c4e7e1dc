"""The one error tinycnn-prepare raises for a bad input or environment."""

from ..errors import TinycnnError

__all__ = ["PrepareError"]


class PrepareError(TinycnnError, ValueError):
    """Bad input or environment; the message says what is wrong and where (the recipes print it as one
    line)."""
