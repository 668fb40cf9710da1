"""Errors a user can fix: shown as one line naming what and where, never as a traceback."""


class UserError(Exception):
    """Bad input from the operator (flag, config file, profile, address). Exit status 2."""

    exit_code = 2
