"""The one switch between compiled and pure-Python implementations.

``L4PROXY_NO_EXTENSIONS=1`` forces the pure-Python twins, as in aiohttp's
``AIOHTTP_NO_EXTENSIONS``. Each chooser module (``l4proxy.dataplane.peek``,
``l4proxy.dataplane.pump``) asks :func:`load` once at import time.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = os.environ.get("L4PROXY_NO_EXTENSIONS", "") not in ("", "0")


def load(name: str) -> tuple[ModuleType, str]:
    """Return ``(module, "compiled"|"pure")`` for the twin called *name*.

    The compiled module is ``l4proxy.dataplane._ext.<name>``; its twin is
    ``l4proxy.dataplane._<name>_py``.
    """
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"l4proxy.dataplane._ext.{name}"), "compiled"
        except ImportError:
            pass
    return importlib.import_module(f"l4proxy.dataplane._{name}_py"), "pure"


def load_pure(name: str) -> ModuleType:
    return importlib.import_module(f"l4proxy.dataplane._{name}_py")


def load_compiled(name: str) -> ModuleType:
    """Import the compiled twin; raises ImportError when it was not built."""
    return importlib.import_module(f"l4proxy.dataplane._ext.{name}")
