"""The error acpi/ raises when a table it parses (the host's) is not in the format ACPI defines."""

from __future__ import annotations

from coreslice.errors import CoresliceError


class AcpiFormatError(CoresliceError):
    """A table is truncated or malformed; the message names the table and what is wrong.

    Exit status 2, like UsageError: it is found while reading the host, before anything is
    written.  The caller, who knows where the bytes came from, may add the file and a fix.
    """

    exit_code = 2
