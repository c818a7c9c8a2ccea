"""The one exception type for mistakes a user can fix (bad paths, bad data, bad settings)."""


class AstCvError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it.

    The command-line entry points print only this message (no traceback) unless --debug is given.
    """
