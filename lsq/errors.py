"""The one error type the library raises for bad input.

Its message is written for a person: what was wrong and what to do. The app and the CLI show it as
it is; anything else escaping the library is a bug.
"""


class LSQError(ValueError):
    """Bad input or an impossible request, with a message meant to be shown to the user."""
