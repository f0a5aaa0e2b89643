"""The one exception ddmkit raises for bad input; the CLI prints its message and exits 2."""


class DDMError(Exception):
    """A problem the user can fix: the message names it and says how."""
