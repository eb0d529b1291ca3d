"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment: the message is shown to the user as is.

    Raise it with a single sentence that says what is wrong and what to do instead.
    """
