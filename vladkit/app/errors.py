"""The ``vladkit`` command's exit codes, and the errors its commands report in one line.

Standard library only: :mod:`vladkit.app.cli` imports it before the arguments are parsed.
Exit codes: 0 success, 1 the job failed, 2 bad usage (argparse's convention).
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A failure to report in one line and exit with status 1."""


class UsageError(Exception):
    """Options that make no sense together: reported in one line, exit status 2."""
