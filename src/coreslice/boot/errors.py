"""The error boot/ raises when a file is not in the format the Linux boot protocol defines."""

from __future__ import annotations

from coreslice.errors import CoresliceError


class BootFormatError(CoresliceError):
    """A kernel image is malformed, truncated or unusable for a 64-bit boot.

    ``str(err)`` says what is wrong with the bytes; the caller, who knows where they came from,
    names the file and the fix (plan/boot.py).  ``fix`` is set when the format itself points to a
    specific remedy (e.g. "use a kernel built with CONFIG_RELOCATABLE=y").  Exit status 2, like
    UsageError: it is found before anything is written.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.fix = fix
