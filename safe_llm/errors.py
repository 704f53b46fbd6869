"""The base of every error that is the user's to fix (bad input, missing files...).

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class SafeLLMError(ValueError):
    """Bad input: the message says what was wrong and what to do."""
