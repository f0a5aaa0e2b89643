"""The user's own code, imported by name ("package.module:attr", the form configs use for network
classes, feature functions and data set functions), with an error that says which part failed:

    import_named("mynets:Velocity", "expert.net.arch")

- no module of that name: install its package or put its folder on PYTHONPATH, or fix the name;
- a module that is found but fails as it loads (a SyntaxError, its own missing import): fix the module,
  named with the file and line where it failed;
- a module without the attribute: the closest names it defines.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import traceback

from ddmkit.errors import DDMError


def _is_missing(module: str, error: ImportError) -> bool:
    """Whether `error` says that `module` itself (or a package above it) does not exist, rather than that
    an import inside it failed."""
    missing = getattr(error, "name", None)
    return isinstance(error, ModuleNotFoundError) and missing is not None and \
        (module == missing or module.startswith(missing + "."))


def _where_it_failed(error: BaseException) -> str:
    """' at FILE:LINE' of the innermost frame of the failing import (or of a SyntaxError's text)."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}:{error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename]
    return f" at {user[-1].filename}:{user[-1].lineno}" if user else ""


def what_it_is(obj: object) -> str:
    """What an imported name turned out to be, with its article, for a message: 'an int', 'a str', 'a class'."""
    kind = "class" if isinstance(obj, type) else type(obj).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"


def import_named(name: str, field: str) -> object:
    """The object `name` ("package.module:attr", attr may be dotted) names, importing its module; a DDMError
    opening with `field` (the setting that names it) when it cannot be had."""
    module, _, attr = name.partition(":")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # ImportError, or the module failing as it loads
        if isinstance(e, ImportError) and _is_missing(module, e):
            raise DDMError(f"{field}: cannot import {name!r}: there is no module {module!r}; put the folder that "
                           "holds it on PYTHONPATH (e.g. `PYTHONPATH=. ddmkit ...`) or install its package, or fix "
                           "the name") from None
        raise DDMError(f"{field}: cannot import {name!r}: the module {module!r} was found but failed as it loaded "
                       f"({type(e).__name__}: {str(e)[:200]}{_where_it_failed(e)}); fix the module") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and not inspect.ismodule(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, 1)  # not a module it imports ('np' for 'nope')
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DDMError(f"{field}: cannot import {name!r}: {getattr(obj, '__name__', module)!r} has no "
                           f"{part!r}{hint}") from None
        obj = getattr(obj, part)
    return obj
