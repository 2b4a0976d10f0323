"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a path, a name, a checkpoint or a layout that is not what was expected."""
