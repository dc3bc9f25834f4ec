"""A small blocking client for a running gateway's ``POST /v1/query`` (``pgqg --url``).

The standard library's `urllib` is enough for one request at a time from a command
line, and keeps the command free of an event loop. Answers are parsed without losing
digits: every JSON number stays the text the gateway sent (`RawNumber`), so a float
or a number inside a jsonb value is printed back exactly as PostgreSQL wrote it.
Streamed answers (NDJSON, CSV) are handed on chunk by chunk as they arrive.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "GatewayClient",
    "GatewayRefused",
    "GatewayUnreachable",
    "RawNumber",
    "StreamCut",
    "loads_raw",
]

#: how much of a streamed answer is read at once, at most
STREAM_CHUNK = 64 * 1024

#: the gateway bounds every request by its own statement timeout; this only guards
#: against a gateway that stopped answering altogether
DEFAULT_TIMEOUT_S = 600.0


class RawNumber(str):
    """A JSON number exactly as it was written (``1.50``, ``1e+20``, 2**70 …)."""

    __slots__ = ()


def loads_raw(body: bytes) -> Any:
    """Parse JSON keeping every number as its `RawNumber` text.

    Raises:
        ValueError: the body is not UTF-8 JSON.
    """
    return json.loads(body, parse_int=RawNumber, parse_float=RawNumber)


class GatewayUnreachable(Exception):
    """No answer from the gateway: nothing listens there, a network error, a timeout,
    or an answer that is not the gateway's JSON."""


class GatewayRefused(Exception):
    """The gateway answered with an error (DESIGN §3's error shape).

    `error` is the ``{"code", "message", "sqlstate", "detail", "hint", "position"}``
    object; `status` the HTTP status.
    """

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        self.status = status
        self.error = error
        self.code = str(error.get("code") or "error")
        self.message = str(error.get("message") or f"HTTP {status}")
        super().__init__(self.message)

    def field(self, name: str) -> str | None:
        value = self.error.get(name)
        return None if value is None else str(value)


class StreamCut(Exception):
    """The gateway ended a streamed answer without finishing it: the statement failed
    after its first rows (NDJSON's last line says why), or the connection broke."""


class GatewayClient:
    """Talks to the gateway at `url` (``http://host:port``, a path prefix allowed)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if "://" not in url:
            url = "http://" + url  # "localhost:8080" is what people type
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self._timeout = timeout

    def query(self, sql: str, params: list[Any]) -> dict[str, Any]:
        """Run one statement with ``POST /v1/query`` (rows as arrays, in column order).

        Returns the gateway's result object, numbers as `RawNumber`.

        Raises:
            GatewayRefused: the gateway answered with an error (a PostgreSQL error
                included: its fields are in `GatewayRefused.error`).
            GatewayUnreachable: no usable answer.
        """
        body = json.dumps({"sql": sql, "params": params, "shape": "arrays"}).encode()
        result = self._decode(self._read_all(self._post("/v1/query", body, "application/json")))
        if not isinstance(result, dict) or "columns" not in result or "rows" not in result:
            raise GatewayUnreachable(f"{self.url} did not answer with a query result")
        return result

    def stream(
        self, sql: str, params: list[Any], *, media_type: str, shape: str = "objects"
    ) -> Iterator[bytes]:
        """Run one statement with ``POST /v1/query``, every row streamed as `media_type`
        (``application/x-ndjson`` or ``text/csv``), without the gateway's ``max_rows``.

        Yields the body's bytes as they arrive.

        Raises:
            GatewayRefused: the gateway answered with an error (before the first row).
            GatewayUnreachable: no usable answer.
            StreamCut: the answer stopped short (after the bytes yielded so far).
        """
        body = json.dumps({"sql": sql, "params": params, "shape": shape}).encode()
        with self._post("/v1/query", body, media_type) as response:
            while chunk := self._read(response.read1, STREAM_CHUNK):
                yield chunk

    def get(self, path: str) -> bytes:
        """The body of ``GET path`` (``/v1/stats``, ``/metrics``), as it came.

        Raises:
            GatewayRefused: the gateway answered with an error (a 404 for
                ``/metrics`` when its metrics are off).
            GatewayUnreachable: no usable answer.
        """
        return self._read_all(self._open(urllib.request.Request(self.url + path, method="GET")))

    def _post(self, path: str, body: bytes, accept: str) -> http.client.HTTPResponse:
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Accept": accept},
        )
        return self._open(request)

    def _read_all(self, response: http.client.HTTPResponse) -> bytes:
        """The whole body of `response`, which is closed after.

        Raises:
            GatewayUnreachable: it stopped short, or the connection failed.
        """
        with response:
            try:
                return self._read(response.read)
            except StreamCut as exc:
                raise GatewayUnreachable(str(exc)) from None

    def _read(self, read: Callable[..., bytes], *size: int) -> bytes:
        """`read(*size)` of an answer's body.

        Raises:
            StreamCut: the body stopped short, or the connection broke.
            GatewayUnreachable: the gateway stopped answering.
        """
        try:
            data = read(*size)
        except http.client.IncompleteRead:
            raise StreamCut(f"{self.url} cut its answer short") from None
        except TimeoutError:
            raise GatewayUnreachable(
                f"the gateway at {self.url} did not answer within {self._timeout:.0f} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise StreamCut(f"the connection to {self.url} broke: {exc}") from None
        return data

    def _open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        """The gateway's successful answer to `request`, its body unread (the caller
        closes it).

        Raises:
            GatewayRefused: it answered with an error.
            GatewayUnreachable: no usable answer.
        """
        try:
            response: http.client.HTTPResponse = urllib.request.urlopen(
                request, timeout=self._timeout
            )
            return response
        except urllib.error.HTTPError as exc:
            with exc:
                answer = self._decode(exc.read(), status=exc.code)
            error = answer.get("error") if isinstance(answer, dict) else None
            if not isinstance(error, dict):
                raise GatewayUnreachable(
                    f"{self.url} answered HTTP {exc.code} without an error body"
                ) from None
            raise GatewayRefused(exc.code, error) from None
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
            raise GatewayUnreachable(
                f"cannot reach the gateway at {self.url}: {reason or exc.reason}"
            ) from None
        except TimeoutError:
            raise GatewayUnreachable(
                f"the gateway at {self.url} did not answer within {self._timeout:.0f} s"
            ) from None
        except (ConnectionError, OSError) as exc:
            raise GatewayUnreachable(f"the connection to {self.url} failed: {exc}") from None

    def _decode(self, body: bytes, status: int = 200) -> Any:
        try:
            return loads_raw(body)
        except ValueError:
            raise GatewayUnreachable(
                f"{self.url} answered HTTP {status} with something that is not JSON "
                "(is it a pgqg gateway?)"
            ) from None
