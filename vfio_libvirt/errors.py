"""Exception types that carry the exit code the CLI and the hook report.

Every error the product raises on purpose is one of these, so the front ends can turn
it into one readable line and the documented exit code (2 bad input, 1 failure)
instead of a traceback.
"""


class VfioLibvirtError(Exception):
    """Base class; `exit_code` is what a front end exits with."""

    exit_code = 1


class InputError(VfioLibvirtError):
    """The caller gave us something we refuse to act on; nothing was written."""

    exit_code = 2


class OperationError(VfioLibvirtError):
    """A well-formed request that could not be carried out on this host."""

    exit_code = 1
