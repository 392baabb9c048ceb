"""The one exception type that means "the user asked for something we cannot do"."""


class TokenprobeError(Exception):
    """A problem with the user's input or environment.

    The CLI prints the message as a single line (no traceback) and exits non-zero, so the
    message must say what is wrong and what to do about it.
    """
