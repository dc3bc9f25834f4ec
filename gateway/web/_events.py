"""Live events: ``GET /v1/listen/{channel}`` streams NOTIFYs as server-sent events.

Each notification on a channel the request names is one event::

    event: notify
    id: orders:17
    data: <the payload>

``id`` is the channel and the notification's number on it (a stream of several
channels must say which one each event is of; EventSource shows only the
event's type, data and id). Besides those: ``missed`` (the gateway lost its
LISTEN connection and is back: refetch) and ``dropped`` (the last event: this
subscriber was too slow, or the gateway is stopping), both with a JSON
``data``; and a comment line when the stream has been quiet for
``listen_heartbeat_s``, so proxies keep it open.

The response starts only once every channel is LISTENed to: a client that has
the headers gets every notification sent from then on.
"""

from __future__ import annotations

import asyncio
import re

import orjson
from aiohttp import web

from .._errors import BadRequest, Forbidden, NotAcceptable
from .._settings import Settings
from ..engine._listener import Event, EventKind, Subscription, check_channel
from ._app_keys import AUTH, LISTENER, SETTINGS

routes = web.RouteTableDef()

#: most channels one stream may follow
MAX_CHANNELS = 64
_MEDIA_TYPE = "text/event-stream"
#: SSE ends a line at CR LF, LF or CR: a payload's line breaks become data lines
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_HEARTBEAT = b": keep-alive\n\n"
_MESSAGES = {
    "reconnected": "the gateway's LISTEN connection was lost and is back;"
    " notifications may have been missed",
    "slow": "this stream fell more than PGQG_LISTEN_BUFFER events behind and was dropped",
    "shutdown": "the gateway is shutting down",
}


def request_role(request: web.Request) -> str | None:
    """The role of the request's verified token (docs/identity.md); None for a
    request without a token, and for every request when the gateway verifies none.

    Raises:
        InvalidToken: the token does not verify.
        ForbiddenRole: the token names something that cannot be a role.
    """
    authorization = request.headers.get("Authorization")
    if authorization is None:
        return None
    identity = request.app[AUTH].identify(authorization)
    return None if identity is None else identity.role


def allowed(settings: Settings, role: str | None, channel: str) -> bool:
    """Whether `role` (None: anonymous, the role ``anon``) may listen to `channel`
    by ``listen_channels``: a rule is the channel's name, a prefix and ``*``, or ``*``."""
    for rule in settings.listen_channels.get("anon" if role is None else role, ()):
        if rule == channel or (rule.endswith("*") and channel.startswith(rule[:-1])):
            return True
    return False


def _channels(request: web.Request) -> list[str]:
    """The channels the request names, in its order, each once.

    Raises:
        BadRequest: no channel, too many, a name that is not an identifier, or
            a query-string key other than ``channel``.
    """
    if unknown := sorted(set(request.query) - {"channel"}):
        raise BadRequest(f"unknown query-string key(s): {', '.join(unknown)}; only channel")
    names = request.query.getall("channel", [])
    if "channel" in request.match_info:
        names.insert(0, request.match_info["channel"])
    if not names:
        raise BadRequest("name a channel: /v1/listen/{channel} or ?channel=a&channel=b")
    unique = list(dict.fromkeys(names))
    if len(unique) > MAX_CHANNELS:
        raise BadRequest(f"{len(unique)} channels; one stream follows at most {MAX_CHANNELS}")
    return [check_channel(name) for name in unique]


def _check_allowed(request: web.Request, channels: list[str]) -> None:
    """Raises Forbidden unless the request's role may listen to every channel."""
    settings = request.app[SETTINGS]
    if not settings.listen_channels:
        raise Forbidden(
            "live events are off on this gateway: PGQG_LISTEN_CHANNELS says which roles"
            ' may listen to which channels, e.g. {"anon": ["news"]}'
        )
    role = request_role(request)
    refused = [name for name in channels if not allowed(settings, role, name)]
    if refused:
        who = "anonymous requests" if role is None else f"role {role!r}"
        raise Forbidden(f"{who} may not listen to {', '.join(refused)} (PGQG_LISTEN_CHANNELS)")


def _check_accept(request: web.Request) -> None:
    """Raises NotAcceptable when ``Accept`` rules out an event stream."""
    header = request.headers.get("Accept")
    if not header:
        return
    for part in header.split(","):
        if part.split(";")[0].strip().lower() in (_MEDIA_TYPE, "text/*", "*/*"):
            return
    raise NotAcceptable(f"/v1/listen answers {_MEDIA_TYPE} only")


def encode(event: Event) -> bytes:
    """`event` as SSE text."""
    if event.kind is EventKind.NOTIFY:
        head = b"event: notify\nid: %s:%d\n" % (event.channel.encode(), event.seq)
        if "\n" not in event.payload and "\r" not in event.payload:
            return head + b"data: " + event.payload.encode() + b"\n\n"
        lines = _LINE_BREAK.split(event.payload)
        return head + b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"
    data = orjson.dumps({"reason": event.reason, "message": _MESSAGES.get(event.reason, "")})
    return b"event: %s\ndata: %s\n\n" % (event.kind.value.encode(), data)


@routes.get("/v1/listen")
@routes.get("/v1/listen/{channel}")
async def listen(request: web.Request) -> web.StreamResponse:
    """Stream the NOTIFYs of the channels named as server-sent events.

    Raises:
        BadRequest: a channel name is not an identifier (see `_channels`).
        Forbidden: live events are off, or the request's role may not listen.
        NotAcceptable: ``Accept`` rules out ``text/event-stream``.
        Overloaded: too many streams are open (``listen_max_subscribers``).
        Unavailable: the LISTEN could not be placed (the database is down).
    """
    settings = request.app[SETTINGS]
    _check_accept(request)
    channels = _channels(request)
    _check_allowed(request, channels)
    listener = request.app[LISTENER]
    sub = await listener.subscribe(channels)
    response = web.StreamResponse(
        headers={
            "Content-Type": f"{_MEDIA_TYPE}; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx would hold events back otherwise
        }
    )
    # a stream's connection is never reused: once the gateway ends a stream it closes
    # it, so the timer below can never cut a later request on the same connection
    response.force_close()
    grace_s = settings.listen_heartbeat_s

    def cut(_: object) -> None:
        # the gateway ended the stream (slow, or stopping): the client gets one heartbeat
        # interval to take its last events, then the connection is closed under it.  Never
        # cancelled: a writer can be stuck in our write or, once the handler returned, in
        # aiohttp's drain at the end of the response, on a client that reads nothing more
        asyncio.get_running_loop().call_later(grace_s, _abort, request)

    sub.ended.add_done_callback(cut)
    try:
        await response.prepare(request)
        await response.write(b": listening to " + ", ".join(channels).encode() + b"\n\n")
        await _pump(response, sub, settings.listen_heartbeat_s)
    except ConnectionError:
        pass  # the client went away
    finally:
        sub.ended.remove_done_callback(cut)
        listener.unsubscribe(sub)
    return response


async def _pump(response: web.StreamResponse, sub: Subscription, heartbeat_s: float) -> None:
    """Write `sub`'s events until its final one; a comment when quiet for `heartbeat_s`."""
    while True:
        events = await sub.take(heartbeat_s)
        if not events:
            if sub.ended.done():
                return
            await response.write(_HEARTBEAT)
            continue
        await response.write(b"".join(encode(event) for event in events))
        if events[-1].kind is EventKind.DROPPED:
            return


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
