"""The one exception type users see: a single line naming the file or key and the fix."""


class AlpsError(Exception):
    """A user-facing error. The CLI prints ``alps-ds: error: <message>`` and exits 2.

    Messages are one line: what is wrong, where (file, key, row), and how to fix it.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check_choice(name: str, value: object, choices) -> None:
    """One AlpsError line ``NAME 'VALUE' is unknown; choose one of ...`` when ``value`` is not a choice.

    ``name`` is what the user wrote: a flag (``--metric``), a config key or a function argument.
    """
    if value not in choices:
        raise AlpsError(f"{name} {value!r} is unknown; choose one of {', '.join(map(str, choices))}")
