"""The one exception ddmkit raises for bad input (the CLI prints its message and exits 2), counted(), the
count and noun its messages write, and shortened(), how the CLI shows a message that quotes a very long value."""
import re

LONG = 500  # characters: a longer run without a space or a quote is shown shortened (shortened); no path is as long
HEAD, TAIL = 60, 40  # the characters of such a run that are shown: its start and its end (a path's file name)
_RUN = re.compile(rf"[^\s'\"`:=,;()\[\]{{}}]{{{LONG + 1},}}")  # a value, a path or a field name, not its quotes


class DDMError(Exception):
    """A problem the user can fix: the message names it and says how."""


def with_fix(wrong: str, fix: str) -> str:
    """A message: what is wrong, then its fix: a clause after '; ' ('train it again'), or a sentence of its own
    after '. ' (a fix that starts with a capital: 'Pass --force to ...')."""
    return f"{wrong}{'. ' if fix[:1].isupper() else '; '}{fix}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun, singular or plural as the count asks: counted(1, "file") is '1 file',
    counted(3, "file") '3 files'; plural for the other forms, e.g. counted(n, "file is", "files are")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def shortened(message: str) -> str:
    """`message` with every value in it of more than LONG characters (a run without a space, a quote or a
    separator such as = or :) cut to its first HEAD and last TAIL characters and its length, e.g. 'xxx...xxx
    (3000 characters)': a 3000-character value given to an option is not echoed whole in its error."""
    return _RUN.sub(lambda m: f"{m.group()[:HEAD]}...{m.group()[-TAIL:]} ({len(m.group())} characters)", message)
