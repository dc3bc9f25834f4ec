"""The compiled request path: installed whole, or not at all."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from gateway import _build
from gateway._build import COMPILED_MODULES, can_compile, compiled_modules, stale_modules
from gateway.engine import _jobs


def test_the_request_path_is_compiled_whole_or_not_at_all() -> None:
    compiled = compiled_modules()
    assert compiled in ([], list(COMPILED_MODULES)), f"a partial build: {compiled}"
    if os.environ.get("CI") == "true":  # CI installs the default way: compiled
        assert compiled == list(COMPILED_MODULES)


def test_a_compiled_module_is_the_one_imported() -> None:
    compiled = "engine._jobs" in compiled_modules()
    assert _jobs.__file__ is not None
    assert _jobs.__file__.endswith(".py") is not compiled


def test_the_build_under_test_is_current() -> None:
    assert stale_modules() == []


def test_the_build_backend_installs_the_dependencies_mypyc_checks_against(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pip's isolated build environment holds only what the backend asks for:
    # without psycopg's and aiohttp's annotations mypyc's type check fails
    monkeypatch.chdir(Path(__file__).parents[1])  # a build runs in the source tree
    with open("pyproject.toml", "rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    monkeypatch.setattr(_build, "will_compile", lambda: True)
    for hook in ("wheel", "editable", "sdist"):
        assert getattr(_build, f"get_requires_for_build_{hook}")() == dependencies
    # an editable install that will not compile (plain Python, or a build it
    # keeps) needs none of them: no minutes spent installing them
    monkeypatch.setattr(_build, "will_compile", lambda: False)
    assert _build.get_requires_for_build_editable() == []
    assert _build.get_requires_for_build_wheel() == dependencies  # a wheel holds the build


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's sources that `_build` looks at instead of this one."""
    project = Path(__file__).parents[1]
    shutil.copytree(
        project / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("*.so", "__*__")
    )
    shutil.copy(project / "setup.py", tmp_path)
    monkeypatch.setattr(_build, "__file__", str(tmp_path / "gateway" / "_build.py"))
    monkeypatch.setattr(_build, "BUILD_RECORD", tmp_path / "build" / "pgqg-native.json")
    return tmp_path


def fake_build(checkout: Path) -> list[Path]:
    """Extensions where a build leaves them: one per compiled module, and the shared one."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    names = [*COMPILED_MODULES, _build.NATIVE_GROUP.removeprefix("gateway.") + "__mypyc"]
    paths = [checkout / "gateway" / f"{name.replace('.', '/')}{suffix}" for name in names]
    for path in paths:
        path.write_bytes(b"built from " + path.name.encode())
    return paths


def test_an_editable_install_keeps_a_build_of_the_very_same_sources(checkout: Path) -> None:
    assert not _build.reusable_build()  # nothing built
    extensions = fake_build(checkout)
    assert not _build.reusable_build()  # extensions, but no build noted them
    _build.record_build()
    assert _build.reusable_build()
    assert not _build.will_compile()

    # any source edited, compiled or not (mypyc checks against them all): compile again
    for edited in ("gateway/web/_routes.py", "gateway/_settings.py", "setup.py"):
        path = checkout / edited
        source = path.read_bytes()
        path.write_bytes(source + b"# edited\n")
        assert not _build.reusable_build(), edited
        path.write_bytes(source)
        assert _build.reusable_build()

    # an extension that is not the one built, or one missing
    original = extensions[0].read_bytes()
    extensions[0].write_bytes(b"another build")
    assert not _build.reusable_build()
    extensions[0].write_bytes(original)
    extensions[-1].unlink()
    assert not _build.reusable_build()

    _build.record_build()
    _build.forget_build()
    assert not _build.reusable_build()


def test_the_build_key_holds_python_and_mypy(
    checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _build.build_key()
    assert _build.build_key() == key
    with monkeypatch.context() as patch:
        patch.setattr(sys, "version", sys.version + " (another)")
        assert _build.build_key() != key
    with monkeypatch.context() as patch:
        patch.setattr(_build.importlib.metadata, "version", lambda name: "0.0-another")
        assert _build.build_key() != key
    assert _build.build_key() == key


def test_a_machine_without_a_c_compiler_installs_plain_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if os.environ.get("CI") == "true":  # CI compiles: it has what that needs
        assert can_compile()
    monkeypatch.setenv("CC", "/nonexistent/cc -O2")
    assert not can_compile()
