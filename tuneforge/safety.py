"""Naming code from a config without evaluating it: `package.module:function`.

A config may name a Python function (a scoring or reward function, for the methods that need one). The only
way such a name becomes code here is `import_callable`: the named module is imported through the normal
import system and the named attribute is read from it. Nothing in a config is ever passed to `eval`, `exec`,
a shell, or an unpickler, so a config can choose *which* installed function runs, never supply code itself.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from tuneforge.errors import ConfigError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# Absolute dotted module path, one colon, one plain attribute name: no calls, subscripts, spaces or relative
# imports can get through, so the text cannot smuggle an expression in.
SPEC = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")


def import_callable(spec: object, key: str) -> Callable:
    """The function named by `spec` ("package.module:function"); ConfigError naming `key` otherwise."""
    if not isinstance(spec, str) or not SPEC.fullmatch(spec):
        raise ConfigError(f"{spec!r} is not of the form package.module:function (a module path, a colon and "
                          "one function name; nothing is evaluated)", key=key)
    module_name, attribute = spec.split(":")
    if attribute.startswith("__"):
        raise ConfigError(f"{spec!r}: refusing the special attribute {attribute!r}", key=key)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} named by {spec!r}: {exc}", key=key) from exc
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}", key=key) from None
    if not callable(target):
        raise ConfigError(f"{spec!r} is a {type(target).__name__}, not a function", key=key)
    return target
