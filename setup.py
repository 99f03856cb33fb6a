"""Build l4proxy: compile ext/*.pyx into l4proxy.dataplane._ext.*, or install pure Python.

The compiled modules are optional. They are skipped, and the pure-Python twins
(l4proxy/dataplane/_peek_py.py, l4proxy/dataplane/_pump_py.py) serve alone, when:

* ``L4PROXY_NO_EXTENSIONS=1`` is set in the environment, or
* Cython is not importable, or
* the C compiler fails.

Each case prints one line saying so; ``l4proxy run`` prints which
implementation it runs at startup.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

EXT_MODULES = ("framing", "peek", "pump", "relay")


def _say(msg: str) -> None:
    print(f"l4proxy setup: {msg}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Compile what we can; a failed compile falls back to pure Python."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any build failure means "pure"
            _say(f"compiling extensions failed ({exc}); installing pure-Python twins only")

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            _say(f"compiling {ext.name} failed ({exc}); its pure-Python twin will be used")


def extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("L4PROXY_NO_EXTENSIONS", "") not in ("", "0"):
        _say("L4PROXY_NO_EXTENSIONS is set; installing pure-Python twins only")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _say("Cython is not installed; installing pure-Python twins only")
        return []
    from setuptools import Extension

    # L4PROXY_EXT_ONLY=peek,pump builds just those (development convenience).
    only = [n for n in os.environ.get("L4PROXY_EXT_ONLY", "").split(",") if n]

    exts = [
        Extension(
            f"l4proxy.dataplane._ext.{name}",
            [f"ext/{name}.pyx"],
            extra_compile_args=["-O2"],
        )
        for name in EXT_MODULES
        if os.path.exists(f"ext/{name}.pyx") and (not only or name in only)
    ]
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
        quiet=True,
    )


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    package_dir={"l4proxy_init": "init", "": "."},
    packages=[
        "l4proxy",
        "l4proxy.canary",
        "l4proxy.dataplane",
        "l4proxy.dataplane._ext",
        "l4proxy.demo",
        "l4proxy.rules",
        "l4proxy.sidecar",
        "l4proxy_init",
    ],
    package_data={"l4proxy.dataplane._ext": ["*.pyi"], "l4proxy": ["py.typed"]},
)
