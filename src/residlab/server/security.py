"""Who may talk to the server: bind check, Host header, origin, token, body type and size.

The server holds a model and can read and write experiment folders, so it is closed by
default: it binds loopback, a non-loopback bind needs a token, and with a token every request
(API, page, OpenAPI document) must carry it. A browser cannot set an ``Authorization`` header
on a page load, so ``GET ...?token=T`` is accepted once: the answer is a redirect to the same
URL without the token that sets an ``HttpOnly; SameSite=Strict`` cookie named after the
server's port (``residlab_token_8765``), which then authenticates the page and its own
``fetch`` calls. Cookies are not port-scoped: every server on the same host name receives it,
and a page on another port of the same host is "same-site" for SameSite.

So every request that changes something (anything but GET and HEAD) must also come from the
server's own origin: a ``Sec-Fetch-Site`` other than ``same-origin`` / ``none``, or an
``Origin`` whose host:port is not the request's Host, is refused (403), and a body must be
``application/json`` (415): a cross-site ``<form>`` can send neither, even to a tokenless
loopback server or with the cookie of another localhost port.

On a loopback bind the Host header must name the loopback (``127.0.0.1``, ``localhost``,
``[::1]``, or the bound address; any port): a DNS-rebinding page reaches 127.0.0.1 under its
own host name and is refused. No CORS headers are sent at all, so other origins cannot read
any answer.

The body limit is enforced while reading: a declared ``Content-Length`` over the limit is
refused before any byte is read, and a chunked body is counted as it arrives. Accepted bodies
are at most the limit, so they are buffered and replayed to the app; after the body, the app's
``receive`` reads the real connection (a streaming route still sees the client disconnect).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from residlab.errors import UsageError

__all__ = [
    "COOKIE_NAME",
    "DEFAULT_MAX_BODY_BYTES",
    "LOOPBACK_NAMES",
    "SecurityMiddleware",
    "allowed_hosts_for",
    "check_bind",
    "cookie_name",
    "is_json",
    "is_loopback",
    "resolve_token",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: chat requests and id batches are far smaller
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
COOKIE_NAME = "residlab_token"
TOKEN_ENV = "RESIDLAB_TOKEN"
SAFE_METHODS = frozenset({"GET", "HEAD"})  # what a request may do without the origin check


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; ``0.0.0.0`` and every other address are not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def resolve_token(token: str | None) -> str | None:
    """The token given, else ``RESIDLAB_TOKEN``; an empty string counts as none.

    Only printable ASCII: HTTP headers arrive as latin-1 bytes, so any other character could
    never match what the client sends."""
    value = token if token is not None else os.environ.get(TOKEN_ENV)
    if value and not (value.isascii() and value.isprintable() and value == value.strip()):
        raise UsageError(f"the token (--token / {TOKEN_ENV}) must be printable ASCII without "
                         "leading or trailing spaces; choose another one")
    return value or None


def allowed_hosts_for(host: str) -> frozenset[str] | None:
    """The Host names a server bound to ``host`` answers to: the loopback names plus the bound
    address on a loopback bind (``127.0.0.2``), ``None`` (no check) on any other."""
    if not is_loopback(host):
        return None
    return LOOPBACK_NAMES | {host.strip().strip("[]").lower()}


def cookie_name(port: int | None) -> str:
    """The cookie holding this server's token digest: one name per port, so two servers on
    one machine do not overwrite each other's cookie."""
    return COOKIE_NAME if port is None else f"{COOKIE_NAME}_{port}"


def is_json(content_type: str | None) -> bool:
    """``application/json`` (any parameters): what no cross-site form can send."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a model to the network without a token."""
    if not is_loopback(host) and not token:
        raise UsageError(f"--host {host} is reachable from other machines; give --token T (or "
                         f"set {TOKEN_ENV}) so that requests must carry it, or bind 127.0.0.1")


def _host_name(header: str) -> str:
    """``localhost:8765`` -> ``localhost``; ``[::1]:8765`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    """``("localhost", 8765)`` of ``localhost:8765``; the scheme's port when none is given;
    ``None`` when it does not parse."""
    try:
        parts = urlsplit(f"//{netloc.strip()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme.lower())
    return parts.hostname.lower(), port if port is not None else default


def _cross_origin(scope: Scope, headers: dict[str, str]) -> bool:
    """True when a browser says the request comes from another origin than this server."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False  # not from a browser page (curl, the Python client)
    parts = urlsplit(origin.strip())
    theirs = _host_port(parts.netloc, parts.scheme) if parts.scheme else None
    ours = _host_port(headers.get("host", ""), scope.get("scheme", "http"))
    return theirs is None or ours is None or theirs != ours


def _cookie_values(header: str, wanted: str) -> list[str]:
    """The values of cookie ``wanted`` in a Cookie header, parsed by hand: a malformed cookie
    of another site (``x=a b``) must not hide ours, as it does with ``http.cookies``; a name
    sent twice (another path) gives both values."""
    values = []
    for item in header.split(";"):
        name, sep, value = item.partition("=")
        if sep and name.strip() == wanted:
            values.append(value.strip().strip('"'))
    return values


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in scope.get("headers", [])}


def _cookie_value(token: str) -> str:
    """What the cookie holds: a digest of the token (cookie-safe for any token, and the token
    itself never sits in the browser's cookie store)."""
    return hashlib.sha256(b"residlab-cookie:" + token.encode()).hexdigest()


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


async def _json_error(send: Send, status: int, message: str,
                      headers: Collection[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class SecurityMiddleware:
    """Host check (400), origin (403), token (401), body type (415) and size (413), in that
    order, before the app runs."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int,
                 allowed_hosts: Collection[str] | None = LOOPBACK_NAMES):
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {
            h.strip().strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        if scope["type"] == "websocket":  # no route uses them
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _json_error(send, *refusal)
            return
        if self.token is not None and not await self._authorised(scope, headers, send):
            return
        if scope["method"] not in SAFE_METHODS and not is_json(headers.get("content-type")):
            await _json_error(send, 415, "send the request body as JSON with 'Content-Type: "
                                         "application/json'")
            return
        try:
            body = await self._read_body(headers, receive)
        except _TooLarge:
            await _json_error(send, 413, f"request body over {self.max_body_bytes} bytes; "
                                         "send less per request")
            return
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """``(status, message)`` for a request from the wrong host or origin, else None."""
        if self.allowed_hosts is not None and _host_name(
                headers.get("host", "")) not in self.allowed_hosts:
            names = ", ".join(sorted(f"[{h}]" if ":" in h else h for h in self.allowed_hosts))
            return 400, f"this server answers only to {names} in the Host header"
        if scope["method"] not in SAFE_METHODS and _cross_origin(scope, headers):
            return 403, ("a request from another origin (Origin / Sec-Fetch-Site) may not "
                         "change anything here; use the server's own page or a non-browser "
                         "client")
        return None

    def _cookie_name(self, scope: Scope) -> str:
        server = scope.get("server")
        return cookie_name(server[1] if server and len(server) > 1 else None)

    async def _authorised(self, scope: Scope, headers: dict[str, str], send: Send) -> bool:
        """True when the request carries the token; otherwise answers (401 or the cookie
        redirect) and returns False."""
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(given.strip(), self.token):
            return True
        expected = _cookie_value(self.token)
        if any(_same(value, expected) for value in _cookie_values(
                headers.get("cookie", ""), self._cookie_name(scope))):
            return True
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                          keep_blank_values=True)
        given_query = dict(query).get("token")
        if scope["method"] in SAFE_METHODS and _same(given_query, self.token):
            await self._cookie_redirect(scope, query, send)
            return False
        await _json_error(send, 401, "missing or wrong token: send 'Authorization: Bearer T' "
                                     "(the server's --token / RESIDLAB_TOKEN)",
                          [(b"www-authenticate", b"Bearer")])
        return False

    async def _cookie_redirect(self, scope: Scope, query: list[tuple[str, str]],
                               send: Send) -> None:
        """``GET /chat?token=T`` -> 303 to ``/chat`` with the token as a Strict cookie."""
        rest = urlencode([(key, value) for key, value in query if key != "token"])
        path = "/" + (scope.get("root_path", "") + scope["path"]).lstrip("/")  # never //host
        location = quote(path) + (f"?{rest}" if rest else "")
        cookie = (f"{self._cookie_name(scope)}={_cookie_value(self.token)}; HttpOnly; "
                  "SameSite=Strict; Path=/")
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("ascii")),
                                (b"set-cookie", cookie.encode("latin-1")),
                                (b"cache-control", b"no-store"),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> list[Message]:
        """The request's body messages, refused as soon as they pass the limit."""
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and (
                int(declared) > self.max_body_bytes):
            raise _TooLarge
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client went away; the app will see it
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                raise _TooLarge
            if not message.get("more_body", False):
                return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered body first, then the live connection."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
