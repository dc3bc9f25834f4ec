"""Compile the request path with mypyc (everything else is in pyproject.toml).

``PGQG_COMPILE=0`` installs those modules as plain Python instead, as does a
machine without a C compiler; see ``gateway/_build.py`` for which modules and why.
"""

import os
import runpy
import sys

from setuptools import setup


def ext_modules() -> list:
    build = runpy.run_path(os.path.join("gateway", "_build.py"))
    if os.environ.get("PGQG_COMPILE", "1") == "0":
        return plain_python(build)
    if not build["can_compile"]():
        print(
            "pgqg: no C compiler or no Python headers: the request path is installed as"
            " plain Python, about 15 % slower (install gcc and python3-dev, then reinstall)",
            file=sys.stderr,
        )
        return plain_python(build)
    from mypyc.build import mypycify

    paths = build["source_paths"]()
    # one shared library inside the package (not a top-level module of its own)
    return mypycify(paths, opt_level="3", group_name=build["NATIVE_GROUP"])


def plain_python(build: dict) -> list:
    # an earlier build's extensions in a checkout would shadow the sources
    for path in build["built_extensions"]():
        path.unlink()
    return []


setup(ext_modules=ext_modules())
