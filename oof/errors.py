"""The one error type a user sees: a broken rule in their input, named in one line."""


class StackerError(ValueError):
    """Bad input or a broken contract; the CLI prints the message and exits 2.

    The message names the file, row or id and the rule broken, so that the user
    can fix the input without reading a traceback.
    """


def preview(values, n: int = 5) -> str:
    """The first n values for an error message: `'a', 'b', 'c' (+7 more)`."""
    values = list(values)
    more = f" (+{len(values) - n} more)" if len(values) > n else ""
    return ", ".join(repr(str(v)) for v in values[:n]) + more
