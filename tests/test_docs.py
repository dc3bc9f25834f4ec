"""The docs run: every shell example of README.md and docs/*.md is run or says why not.

A fenced ``sh`` block (or ``bash``, ``shell``, ``console``) is marked by an HTML comment on
the line right before its fence, which GitHub does not show:

* ``<!-- run -->``: run with bash (``set -e``, ``pipefail``); it must exit 0.
* ``<!-- run: exits N -->``: the same, and it must exit N (an example of an error).
* ``<!-- run: serves -->``: a ``pgqg serve`` that runs until stopped. It is started,
  its "pgqg is serving on" line awaited, then it gets SIGTERM and must exit 0.
* ``<!-- not run: REASON -->``: not run, for the reason given (it installs, needs
  Docker, runs for minutes, ...).

An unmarked shell block fails `test_every_shell_block_is_marked`, so the docs cannot
grow an example nobody runs. A ```` ```text ```` block right after a run block (blank
lines between are allowed) is its expected output, stdout and stderr together; ``…``
stands for any text within a line, and a line of ``…`` alone for any number of lines.
Lines are compared without trailing spaces (CSV's CRLF included).

The examples are written for a reader next to the quick start's gateway: ``DSN`` is its
database (as its superuser; ``GATEWAY_DSN`` as the role its requests log in as), the
gateway is at ``localhost:8080`` and ``pgqg`` is on the PATH (the venv is also at
``.venv``). Here the gateway is a ``pgqg serve`` subprocess on the test database,
``DSN`` is a database of this module's own with the demo loaded, each block runs in a
fresh directory, and every port the docs use (`DOC_PORTS`) is mapped to a free one.
Needs bash and curl, as the docs do. Running the examples is `slow` (a Python start-up per
``pgqg`` command); the checks of markers and links are not.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import psycopg.conninfo
import pytest
from conftest import TEST_LOGIN
from support import REPO, Served, as_gateway, free_port

from gateway._settings import DEFAULT_SQL_DIR as SQL_DIR

PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

#: pages that other branches add; until they are merged, links to them may not resolve
PAGES_ON_THEIR_WAY = {"docs/faults.md", "docs/security.md"}

SHELLS = {"sh", "bash", "shell", "console"}
#: the gateway the examples talk to, and the ports of the gateways they start themselves
DOC_PORTS = ("8080", "9000", "9001", "9002")
BLOCK_TIMEOUT_S = 120.0  # a few CLI start-ups on a loaded two-core machine
SERVE_TIMEOUT_S = 120.0
ELLIPSIS = "…"

_MARKER = re.compile(r"<!--\s*(run|not run)\s*(?::\s*(.*?))?\s*-->")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)(.*)$")


@dataclass
class Block:
    """A fenced code block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    end: int  # of the closing fence, 1-based
    lang: str
    text: str
    marker: str | None  # "run" or "not run", from the comment line before the fence
    detail: str  # what follows the marker's colon: "exits 1", "serves", a reason
    expected: str | None = None  # the text block right after a run block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def exit_code(self) -> int:
        match = re.fullmatch(r"exits (\d+)", self.detail)
        return int(match.group(1)) if match else 0


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of `page`, each with its marker and expected output."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        ticks, lang = fence.group(2), fence.group(3)
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        marker = _MARKER.fullmatch(lines[i - 1].strip()) if i else None
        found.append(
            Block(
                page=page,
                line=i + 1,
                end=end + 1,
                lang=lang,
                text="\n".join(lines[i + 1 : end]),
                marker=marker.group(1) if marker else None,
                detail=(marker.group(2) or "") if marker else "",
            )
        )
        i = end + 1
    for before, after in itertools.pairwise(found):
        between = lines[before.end : after.line - 1]
        if before.marker == "run" and after.lang == "text" and not any(map(str.strip, between)):
            before.expected = after.text
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in SHELLS and b.marker == "run"]


def test_every_shell_block_is_marked() -> None:
    unmarked = [b.where for b in ALL_BLOCKS if b.lang in SHELLS and b.marker is None]
    assert not unmarked, f"mark these <!-- run --> or <!-- not run: why -->: {unmarked}"
    reasonless = [b.where for b in ALL_BLOCKS if b.marker == "not run" and not b.detail]
    assert not reasonless, f"say why these are not run: {reasonless}"
    unknown = [b.where for b in RUNNABLE if b.detail and b.detail != "serves" and not b.exit_code]
    assert not unknown, f"<!-- run: … --> takes 'exits N' or 'serves': {unknown}"


def test_every_fence_says_its_language() -> None:
    """A block without a language could hide a command from the check above."""
    bare = [b.where for b in ALL_BLOCKS if not b.lang]
    assert not bare, f"give these fences a language (sh, text, json, sql, …): {bare}"


def test_there_are_examples_to_run() -> None:
    assert len(RUNNABLE) >= 10
    assert all(b.expected is not None for b in RUNNABLE if b.detail != "serves")


# --- links -------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _outside_fences(page: Path) -> list[tuple[int, str]]:
    """The numbered lines of `page` that are not in a fenced block."""
    out, fence = [], None
    for n, line in enumerate(page.read_text().splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
        else:
            out.append((n, line))
    return out


def _prose(page: Path) -> list[tuple[int, str]]:
    """The lines outside fenced blocks, inline code (which may span lines) blanked out."""
    numbered = _outside_fences(page)
    text = "\n".join(line for _, line in numbered)
    blank = re.sub(
        r"(`+)(?!`).*?(?<!`)\1(?!`)",
        lambda m: "``" + "\n" * m[0].count("\n"),
        text,
        flags=re.DOTALL,
    )
    return list(zip((n for n, _ in numbered), blank.split("\n"), strict=True))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def page_anchors(page: Path) -> set[str]:
    """The anchors of `page`'s headings; a repeated one gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    for _, line in _outside_fences(page):
        if match := _HEADING.match(line):
            base = slug(match.group(2))
            seen[base] = seen.get(base, 0) + 1
    return {f"{base}-{i}" if i else base for base, count in seen.items() for i in range(count)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for n, line in _prose(page):
        for target in _LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = urllib.parse.unquote(target).partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            shown = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
            if not dest.is_relative_to(REPO):
                broken.append(f"{n}: {target} leaves the repository")
            elif not dest.exists():
                if str(shown) not in PAGES_ON_THEIR_WAY:
                    broken.append(f"{n}: {target} ({shown} does not exist)")
            elif anchor and dest.suffix == ".md" and anchor not in page_anchors(dest):
                broken.append(f"{n}: {target} (no heading #{anchor} in {shown})")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_angle_brackets_outside_code(page: Path) -> None:
    """GitHub takes ``<repo>`` in prose for an HTML tag and hides it: put it in backticks."""
    hidden = [
        f"{n}: {tag}"
        for n, line in _prose(page)
        for tag in re.findall(r"<(?!!--)/?[A-Za-z][^>]*>", line)
    ]
    assert not hidden, hidden


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    linked = {Path(t.partition("#")[0]).as_posix() for t in _LINK.findall(readme)}
    pages = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")}
    assert pages | PAGES_ON_THEIR_WAY <= linked, sorted(pages | PAGES_ON_THEIR_WAY - linked)


# --- running the examples ----------------------------------------------------------------


def _uri(dsn: str, dbname: str) -> str:
    """`dsn` as a ``postgresql://`` URI naming `dbname`, as ``pgqg serve`` prints one."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    user = urllib.parse.quote(str(info.get("user") or "postgres"), safe="")
    password = info.get("password")
    auth = user + (":" + urllib.parse.quote(str(password), safe="") if password else "")
    host = str(info.get("host") or "127.0.0.1")
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{auth}@{host}{port}/{dbname}"


def _drop(admin_dsn: str, *names: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


#: databases the examples make, besides the demo's own
MADE_BY_EXAMPLES = ("bookshop",)


@pytest.fixture(scope="module")
def docs_dsn(database_dsn: str) -> Iterator[str]:
    """A database of this module's own with the demo loaded, as a URI (the docs' ``DSN``)."""
    name = "pgqg_docs"
    _drop(database_dsn, name, *MADE_BY_EXAMPLES)
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = _uri(database_dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for file in ("schema.sql", "seed.sql"):
            conn.execute((SQL_DIR / file).read_text())
        # what schema.sql does for the embedded server's login role (docs/identity.md)
        conn.execute(f"GRANT bookshop_reader, bookshop_reviewer TO {TEST_LOGIN}")
    try:
        yield dsn
    finally:
        _drop(database_dsn, name, *MADE_BY_EXAMPLES)


@pytest.fixture(scope="module")
def gateway_port(docs_dsn: str) -> Iterator[str]:
    """A ``pgqg serve`` on the docs' database, ready; its port."""
    served = Served(docs_dsn)
    try:
        served.ready_sync()
        yield str(served.port)
    finally:
        served.stop()


def _environment(dsn: str, gateway_port: str, *, serves: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGQG_")}
    env.pop("DATABASE_URL", None)
    env.update(
        DSN=dsn,
        GATEWAY_DSN=as_gateway(dsn),  # a least-privileged role, as pgqg serve prints it
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",  # stdout and stderr interleaved as written
        PYTHONIOENCODING="utf-8",
        COLUMNS="100",  # rich's tables do not follow the terminal pytest runs in
    )
    if not serves:
        env["PGQG_PORT"] = gateway_port  # where `pgqg query` without --url finds a gateway
    return env


def _with_ports(text: str, ports: dict[str, str]) -> str:
    pattern = "|".join(map(re.escape, ports))
    return re.sub(rf"(?<![\d.])({pattern})(?!\d)", lambda m: ports[m.group(1)], text)


class Example:
    """A block run by bash in a directory of its own, with the docs' ports mapped to real ones."""

    def __init__(self, block: Block, dsn: str, gateway_port: str) -> None:
        self.block, self.dsn, self.gateway_port = block, dsn, gateway_port
        self.ports = {p: gateway_port if p == "8080" else str(free_port()) for p in DOC_PORTS}
        self.expected = None if block.expected is None else _with_ports(block.expected, self.ports)
        self.dir = Path(tempfile.mkdtemp(prefix="pgqg-docs-"))
        (self.dir / ".venv").symlink_to(sys.prefix)  # as in a clone with its venv
        self.log = self.dir / "output.log"

    def start(self) -> subprocess.Popen[bytes]:
        """Bash running the block, in a session of its own (see `close`)."""
        serves = self.block.detail == "serves"
        with self.log.open("w") as out:  # a file, not a pipe: a leftover child cannot block us
            return subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", _with_ports(self.block.text, self.ports)],
                cwd=self.dir,
                env=_environment(self.dsn, self.gateway_port, serves=serves),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def close(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill whatever the block left running (its process group), remove its directory."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Ran:
    """How a block ended: exit status, output, and the output its page expects."""

    code: int
    output: str
    expected: str | None


def run_to_the_end(block: Block, dsn: str, gateway_port: str) -> Ran:
    """Run a block until it exits (`BLOCK_TIMEOUT_S` at most)."""
    example = Example(block, dsn, gateway_port)
    proc = example.start()
    try:
        code = proc.wait(timeout=BLOCK_TIMEOUT_S)
        return Ran(code, example.output(), example.expected)
    finally:
        example.close(proc)


#: blocks run side by side: most of their time is a Python start-up per pgqg command
RUNNERS = 4


@pytest.fixture(scope="module")
def finished(docs_dsn: str, gateway_port: str) -> Iterator[dict[str, Future[Ran]]]:
    """Every block that runs to its end, all started at once; by `Block.where`."""
    with ThreadPoolExecutor(RUNNERS) as pool:
        yield {
            b.where: pool.submit(run_to_the_end, b, docs_dsn, gateway_port)
            for b in RUNNABLE
            if b.detail != "serves"
        }


def output_matches(expected: str, actual: str) -> bool:
    """`actual` is `expected`, ``…`` standing for any text (a line of it: any lines)."""
    parts = []
    for line in expected.rstrip("\n").splitlines():
        if line.strip() == ELLIPSIS:
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(map(re.escape, line.rstrip().split(ELLIPSIS))) + r"\n")
    got = "".join(line.rstrip() + "\n" for line in actual.rstrip().splitlines())
    return re.fullmatch("".join(parts), got, re.DOTALL) is not None


def test_output_matching() -> None:
    assert output_matches('{"a":1,"ms":…}', '{"a":1,"ms":0.42}\n')
    assert not output_matches('{"a":1,"ms":…}', '{"a":2,"ms":0.42}\n')
    assert output_matches("first\n…\nlast", "first\nx\ny\nlast\r\n")
    assert output_matches("first\n…\nlast", "first\nlast")
    assert not output_matches("first", "first\nsecond")
    assert output_matches("a  b", "a  b   \r\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [b for b in RUNNABLE if b.detail != "serves"], ids=lambda b: b.where
)
def test_example_runs(block: Block, finished: dict[str, Future[Ran]]) -> None:
    ran = finished[block.where].result()
    assert ran.code == block.exit_code, ran.output
    assert ran.expected is not None
    assert output_matches(ran.expected, ran.output), (
        f"expected:\n{ran.expected}\ngot:\n{ran.output}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [b for b in RUNNABLE if b.detail == "serves"], ids=lambda b: b.where
)
def test_serve_example_serves_until_sigterm(block: Block, docs_dsn: str, gateway_port: str) -> None:
    example = Example(block, docs_dsn, gateway_port)
    listen = re.search(r"--port (\d+)|port = (\d+)", block.text)
    assert listen, f"{block.where}: say the port, so the example does not take 8080"
    url = f"http://127.0.0.1:{example.ports[listen.group(1) or listen.group(2)]}"
    proc = example.start()
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while f"pgqg is serving on {url}" not in example.output():
            assert proc.poll() is None, f"exited {proc.returncode}:\n{example.output()}"
            assert time.monotonic() < deadline, f"not serving:\n{example.output()}"
            time.sleep(0.05)
        # the server, not bash: bash would die of the signal instead of reporting it
        shell = psutil.Process(proc.pid)
        for child in shell.children(recursive=True) or [shell]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=SERVE_TIMEOUT_S) == 0, example.output()
        output = example.output()
    finally:
        example.close(proc)
    if example.expected is not None:
        assert output_matches(example.expected, output), output
