"""The one exception type users see.

An `AtelierError` carries a message that says what went wrong *and what to do about it*.
The CLI prints it as a single line (no traceback); the API turns it into an HTTP error.
"""


class AtelierError(Exception):
    """A user-facing error whose message names the fix."""
