"""The base of every error a user can fix (a config, an input, a folder in use, a stopped run).

The recipes print these in one line (tinycnn.cli.run_main); any other exception is a bug and shows its traceback.
"""

__all__ = ["TinycnnError"]


class TinycnnError(Exception):
    """An error caused by what the user gave or asked for, with a message that says what to do."""

    __str__ = Exception.__str__  # a subclass that is also a KeyError still reads as its message, unquoted
