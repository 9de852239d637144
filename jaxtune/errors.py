"""The one exception users see: a message that says what is wrong and what to do."""


class JaxtuneError(Exception):
    """Bad input or setup. The CLI prints its message without a traceback."""
