"""Which modules are compiled with mypyc, and whether a checkout's build is current.

The request path (the handlers, validation, jobs, the pipeline, the encoders)
is compiled to C by mypyc when the package is installed (``setup.py``); the
rest stays Python. Compiled modules behave as their sources do, and serve the
benchmark's point selects about 17 % faster. ``PGQG_COMPILE=0 pip install ...``
installs them as plain Python, and so does an install on a machine without a C
compiler or Python's headers (`can_compile`), as aiohttp's and yarl's do.

The dispatcher and its parts (the queue, the wake-ups, the workers and their
leases) stay Python: compiled, a connection worker cancelled while
idle under uvloop did not stop (mypyc 2.4; "invalid exception object" in the
task step), so the gateway did not shut down.

This module is read by ``setup.py`` before the package can be imported: it
uses the standard library only. It is also the package's build backend
(``pyproject.toml``): setuptools', with the project's own dependencies added
to the build environment, because mypyc type-checks the compiled modules
against psycopg's, aiohttp's and the others' annotations.

An editable install that finds next to the sources the extensions a build of
these very sources left (`reusable_build`: the same package sources, Python
and mypy, as `record_build` noted) keeps them instead of compiling again, and
then needs no dependencies in its build environment: the README's second
install command (``pip install -e '.[dev]'`` after ``pip install -e .``) takes
seconds instead of minutes. Any edit to a source compiles afresh.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import json
import os
import shutil
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

#: the shared library the compiled modules' code lives in, inside the package
NATIVE_GROUP = "gateway._native"

#: the modules mypyc compiles (dotted, below ``gateway``), in the order of a
#: request's path through them
COMPILED_MODULES = (
    "web._routes",
    "web._requests",
    "web._neon",
    "values._encoding",
    "catalog._catalog",
    "engine._jobs",
    "engine._stream",
    "values._formats",
    "engine._costs",
    "engine._pipeline",
    "engine._planner",
    "engine._prepared",
    "engine._wire",
    "engine._cancel",
    "engine._reader",
    "engine._housekeeping",
    "engine._outcome",
    "engine._libpq",
    "values._results",
)


#: where a build notes what it compiled, for the next editable install to reuse
BUILD_RECORD = Path(__file__).parents[1] / "build" / "pgqg-native.json"


def can_compile() -> bool:
    """Whether this machine has what compiling needs: a C compiler and ``Python.h``.

    The compiler is ``$CC`` or the one Python was built with, as setuptools picks it.
    """
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return bool(compiler) and shutil.which(compiler[0]) is not None and headers.exists()


def compiled_modules() -> list[str]:
    """The modules of `COMPILED_MODULES` that are imported from an extension, not Python."""
    return [name for name in COMPILED_MODULES if _extension_of(name) is not None]


def stale_modules() -> list[str]:
    """Compiled modules whose Python source changed after they were compiled.

    Python imports the extension, not the edited source: in a checkout
    installed with ``pip install -e .``, run that again after editing one.
    """
    stale = []
    for name in COMPILED_MODULES:
        extension = _extension_of(name)
        source = _path_of(name).with_suffix(".py")
        if extension and source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
            stale.append(name)
    return stale


def stale_build() -> str | None:
    """What to tell whoever is about to test or measure an out-of-date build; None
    when the build is current (or there is none)."""
    stale = stale_modules()
    if not stale:
        return None
    return (
        f"compiled modules older than their source: {', '.join(stale)}; run"
        " `pip install -e .` again (or install with PGQG_COMPILE=0)"
    )


def built_extensions() -> list[Path]:
    """The extensions an earlier build left next to the sources (they shadow them)."""
    shared = NATIVE_GROUP.rpartition(".")[2] + "__mypyc"  # mypyc's name for the group
    found = (_extension_of(name) for name in (*COMPILED_MODULES, shared))
    return [path for path in found if path is not None]


def build_key() -> str:
    """A hash of all that compiled extensions are made from: every source of the
    package (mypyc checks the compiled modules against the others), ``setup.py``,
    the Python that builds them and mypy's version (mypyc is mypy's)."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update((package.parent / "setup.py").read_bytes() + b"\0")
    digest.update(f"{sys.version}\0{sysconfig.get_config_var('EXT_SUFFIX')}\0".encode())
    try:
        digest.update(importlib.metadata.version("mypy").encode())
    except importlib.metadata.PackageNotFoundError:
        digest.update(b"no mypy")
    return digest.hexdigest()


def _extension_digests() -> dict[str, str]:
    package = Path(__file__).parent
    return {
        path.relative_to(package).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in built_extensions()
    }


def record_build() -> None:
    """Note, after a build, what it compiled from (`build_key`) and what it left."""
    BUILD_RECORD.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": build_key(), "extensions": _extension_digests()}
    BUILD_RECORD.write_text(json.dumps(record, indent=1) + "\n")


def forget_build() -> None:
    """The extensions are gone (or replaced): nothing is there to reuse."""
    BUILD_RECORD.unlink(missing_ok=True)


def reusable_build() -> bool:
    """Whether every extension next to the sources is one a build of these very
    sources left (`record_build`), so an editable install may keep them."""
    try:
        record = json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return False
    extensions = _extension_digests()
    return (
        isinstance(record, dict)
        and len(extensions) == len(COMPILED_MODULES) + 1  # and the shared library
        and record.get("extensions") == extensions
        and record.get("key") == build_key()
    )


def will_compile() -> bool:
    """Whether a build here compiles (else it installs plain Python, or keeps a
    reusable build); `PGQG_COMPILE` is read by the build only, never by the gateway."""
    return os.environ.get("PGQG_COMPILE", "1") != "0" and can_compile() and not reusable_build()


def source_paths() -> list[str]:
    """The compiled modules' sources, relative to the project (for mypycify)."""
    project = Path(__file__).parents[1]
    return [f"{_path_of(name).relative_to(project)}.py" for name in COMPILED_MODULES]


def _path_of(name: str) -> Path:
    """Where module `name` (dotted, below the package) lives, without a suffix."""
    return Path(__file__).parent.joinpath(*name.split("."))


def _extension_of(name: str) -> Path | None:
    """The extension module `name` imports from: Python's finder prefers it to the source."""
    base = _path_of(name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (path := base.with_name(base.name + suffix)).exists():
            return path
    return None


# -- PEP 517 build backend: setuptools' hooks, plus the runtime dependencies --


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    """What a build needs besides ``[build-system] requires``: the project's dependencies.

    Not setuptools' hook of the same name: that one runs ``setup.py``, whose
    mypyc type check would fail before the dependencies are installed.
    """
    with open("pyproject.toml", "rb") as file:  # the project being built
        return list(tomllib.load(file)["project"]["dependencies"])


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    """As `get_requires_for_build_wheel`, but nothing when this build will not
    compile: a reusable build is kept (see the module), and plain Python needs
    no type check."""
    return get_requires_for_build_wheel(config_settings) if will_compile() else []


get_requires_for_build_sdist = get_requires_for_build_wheel


def __getattr__(name: str) -> Any:
    """The other build hooks are setuptools' own (imported only when a build asks)."""
    if name.startswith(("build_", "prepare_metadata_")):
        from setuptools import build_meta

        return getattr(build_meta, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
