"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input or an unusable environment: the message is shown to the user as is.

    Raise it with a single sentence that says what is wrong and what to do instead.
    """


class OptionError(UserError):
    """A :class:`UserError` about one option.

    ``option`` is its name (``batch_size``) and ``detail`` what is wrong with it, so that a caller
    that set the option under another name (the report's ``perturb_samples``) can say so in its own
    words.
    """

    def __init__(self, message: str, option: str, detail: str) -> None:
        """Keep the option's name and what was wrong with it beside the whole message."""
        super().__init__(message)
        self.option = option
        self.detail = detail


#: What an OS error number means for someone whose run just failed writing.
_FAULT_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file exceeds a file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file of that name is in the way",
}


def write_fault(error: OSError, setting: str, path: object | None = None) -> UserError:
    """One line for an OS error met while writing.

    The line names the file, the setting it came from (``--out runs/x``,
    ``RESIDUAL_TRACE_CACHE=/c``) and the system's own words.

    Examples:
        >>> import errno
        >>> str(write_fault(OSError(errno.ENOSPC, "No space left on device", "o/a.csv"), "--out o"))
        'cannot write o/a.csv (--out o): No space left on device (the disk is full)'
    """
    where = error.filename if error.filename is not None else path
    reason = error.strerror or str(error) or type(error).__name__
    hint = _FAULT_HINTS.get(error.errno) if error.errno is not None else None
    if hint and hint.lower() not in reason.lower():
        reason = f"{reason} ({hint})"
    target = f" {where}" if where is not None else ""
    return UserError(f"cannot write{target} ({setting}): {reason}")
