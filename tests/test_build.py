"""The compiled request path: installed whole, or not at all."""

from __future__ import annotations

import os
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
    for hook in ("wheel", "editable", "sdist"):
        assert getattr(_build, f"get_requires_for_build_{hook}")() == dependencies


def test_a_machine_without_a_c_compiler_installs_plain_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if os.environ.get("CI") == "true":  # CI compiles: it has what that needs
        assert can_compile()
    monkeypatch.setenv("CC", "/nonexistent/cc -O2")
    assert not can_compile()
