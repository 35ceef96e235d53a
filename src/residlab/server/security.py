"""Who may talk to the server: bind check, token, Host header, body size.

The server holds a model and can read and write experiment folders, so it is closed by
default: it binds loopback, a non-loopback bind needs a token, and with a token every request
(API, page, OpenAPI docs) must carry it. A browser cannot set an ``Authorization`` header on a
page load, so ``GET ...?token=T`` is accepted once: the answer is a redirect to the same URL
without the token that sets an ``HttpOnly; SameSite=Strict`` cookie, which then authenticates
the page and its own ``fetch`` calls (a cross-site page never sends a Strict cookie).

On a loopback bind the Host header must name the loopback (``127.0.0.1``, ``localhost``,
``[::1]``, any port): a DNS-rebinding page reaches 127.0.0.1 under its own host name and is
refused. No CORS headers are sent at all, so other origins cannot read any answer.

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
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from residlab.errors import UsageError

__all__ = [
    "COOKIE_NAME",
    "DEFAULT_MAX_BODY_BYTES",
    "LOOPBACK_NAMES",
    "SecurityMiddleware",
    "check_bind",
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
    """The token given, else ``RESIDLAB_TOKEN``; an empty string counts as none."""
    value = token if token is not None else os.environ.get(TOKEN_ENV)
    return value or None


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
    """Host check (400), token (401), body limit (413), in that order, before the app runs."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int,
                 allowed_hosts: Collection[str] | None = LOOPBACK_NAMES):
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        if scope["type"] == "websocket":  # no route uses them
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = _headers(scope)
        if self.allowed_hosts is not None and _host_name(
                headers.get("host", "")) not in self.allowed_hosts:
            await _json_error(send, 400, "this server answers only to 127.0.0.1, localhost or "
                                         "[::1] in the Host header")
            return
        if self.token is not None and not await self._authorised(scope, headers, send):
            return
        try:
            body = await self._read_body(headers, receive)
        except _TooLarge:
            await _json_error(send, 413, f"request body over {self.max_body_bytes} bytes; "
                                         "send less per request")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _authorised(self, scope: Scope, headers: dict[str, str], send: Send) -> bool:
        """True when the request carries the token; otherwise answers (401 or the cookie
        redirect) and returns False."""
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(given.strip(), self.token):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # an unparsable Cookie header is simply no cookie
            cookie = SimpleCookie()
        if COOKIE_NAME in cookie and _same(cookie[COOKIE_NAME].value, _cookie_value(self.token)):
            return True
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                          keep_blank_values=True)
        given_query = dict(query).get("token")
        if scope["method"] in ("GET", "HEAD") and _same(given_query, self.token):
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
        cookie = f"{COOKIE_NAME}={_cookie_value(self.token)}; HttpOnly; SameSite=Strict; Path=/"
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
