"""Compile the request path with mypyc (everything else is in pyproject.toml).

``PGQG_COMPILE=0`` installs those modules as plain Python instead, as does a
machine without a C compiler; an editable install keeps the extensions a build
of the same sources left. See ``gateway/_build.py`` for which modules and why.
"""

import os
import runpy
import sys

from setuptools import setup

build = runpy.run_path(os.path.join("gateway", "_build.py"))
#: the setup.py commands that only describe the project (pip asks for them first)
METADATA_ONLY = {"egg_info", "dist_info"}


def ext_modules() -> list:
    if os.environ.get("PGQG_COMPILE", "1") == "0":
        return plain_python()
    if not build["can_compile"]():
        print(
            "pgqg: no C compiler or no Python headers: the request path is installed as"
            " plain Python, about 15 % slower (install gcc and python3-dev, then reinstall)",
            file=sys.stderr,
        )
        return plain_python()
    if command() in METADATA_ONLY:
        return []  # mypyc's type check and C code are for the build, not the metadata
    if editable() and build["reusable_build"]():
        print(
            "pgqg: the compiled request path next to the sources was built from these very"
            " sources: kept, not compiled again",
            file=sys.stderr,
        )
        return []
    from mypyc.build import mypycify

    build["forget_build"]()  # until this build has left its extensions
    paths = build["source_paths"]()
    # one shared library inside the package (not a top-level module of its own)
    return mypycify(paths, opt_level="3", group_name=build["NATIVE_GROUP"])


def command() -> str:
    # what setuptools' build backend runs: "setup.py [-v|-q] COMMAND OPTIONS..."
    return next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")


def editable() -> bool:
    # setuptools' PEP 660 hook runs "setup.py editable_wheel": the extensions
    # are built next to the sources, where the next editable install finds them
    return command() == "editable_wheel"


def plain_python() -> list:
    # an earlier build's extensions in a checkout would shadow the sources
    for path in build["built_extensions"]():
        path.unlink()
    build["forget_build"]()
    return []


extensions = ext_modules()
setup(ext_modules=extensions)
if extensions and editable():
    build["record_build"]()
