"""The one exception type for mistakes a user can fix (bad input, missing files).

The CLI prints its message on one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, data or files, explained in one line."""
