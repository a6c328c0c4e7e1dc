"""The one error tinycnn-prepare raises for a bad input or environment."""

__all__ = ["PrepareError"]


class PrepareError(ValueError):
    """Bad input or environment; the message says what is wrong and where (a ValueError: the recipes
    print it as one line)."""
