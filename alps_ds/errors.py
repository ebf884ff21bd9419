"""The one exception type users see: a single line naming the file or key and the fix."""


class AlpsError(Exception):
    """A user-facing error. The CLI prints ``alps-ds: error: <message>`` and exits 2.

    Messages are one line: what is wrong, where (file, key, row), and how to fix it.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
