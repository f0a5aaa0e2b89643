"""The one exception ddmkit raises for bad input (the CLI prints its message and exits 2), and counted(), the
count and noun its messages write."""


class DDMError(Exception):
    """A problem the user can fix: the message names it and says how."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun, singular or plural as the count asks: counted(1, "file") is '1 file',
    counted(3, "file") '3 files'; plural for the other forms, e.g. counted(n, "file is", "files are")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
