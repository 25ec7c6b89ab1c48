"""The one error type a user sees: a broken rule in their input, named in one line."""


class StackerError(ValueError):
    """Bad input or a broken contract; the CLI prints the message and exits 2.

    The message names the file, row or id and the rule broken, so that the user
    can fix the input without reading a traceback.
    """
