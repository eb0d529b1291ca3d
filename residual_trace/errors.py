"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment: the message is shown to the user as is.

    Raise it with a single sentence that says what is wrong and what to do instead.
    """


class OptionError(UserError):
    """A :class:`UserError` about one option: ``option`` is its name (``batch_size``) and
    ``detail`` what is wrong with it, so that a caller that set the option under another
    name (the report's ``perturb_samples``) can say so in its own words."""

    def __init__(self, message: str, option: str, detail: str) -> None:
        super().__init__(message)
        self.option = option
        self.detail = detail
