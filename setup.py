"""Compile the request path with mypyc (everything else is in pyproject.toml).

``PGQG_COMPILE=0`` installs those modules as plain Python instead; see
``gateway/_build.py`` for which modules and why.
"""

import glob
import os
import runpy

from setuptools import setup


def ext_modules() -> list:
    build = runpy.run_path(os.path.join("gateway", "_build.py"))
    if os.environ.get("PGQG_COMPILE", "1") == "0":
        # an earlier build's extensions in a checkout would shadow the sources
        for name in [*build["COMPILED_MODULES"], "_native__mypyc"]:
            for path in glob.glob(os.path.join("gateway", name + ".*.so")):
                os.remove(path)
        return []
    from mypyc.build import mypycify

    paths = [os.path.join("gateway", name + ".py") for name in build["COMPILED_MODULES"]]
    # one shared library inside the package (not a top-level module of its own)
    return mypycify(paths, opt_level="3", group_name="gateway._native")


setup(ext_modules=ext_modules())
