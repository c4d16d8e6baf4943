"""Errors that carry a one-line message naming the problem and the fix.

The CLI prints ``str(err)`` on one line and exits with ``err.exit_code``: 2 for bad input found
before anything was touched, 1 for failures while acting on the machine.
"""


class CoresliceError(Exception):
    exit_code = 1


class UsageError(CoresliceError):
    """Bad input, found before the first write; the machine is unchanged."""

    exit_code = 2


class LaunchError(CoresliceError):
    """A failure while writing memory or waking CPUs."""

    exit_code = 1
