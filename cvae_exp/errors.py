"""The one exception type for mistakes in the user's own input (config values, data paths, checkpoints).

Entry points catch it, print its message as one sentence on stderr and exit with code 2, so a user
never sees a traceback for a typo. Raise it early, before compiling or loading anything large.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the key, value or file."""
