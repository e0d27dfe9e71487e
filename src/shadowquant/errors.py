"""One error type for every bad input: its message is the one line a user sees."""


class PipelineError(Exception):
    """A user-facing error: the message names the file/key/value and what would be valid."""

    def __init__(self, message: str):
        # Keep it on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))
