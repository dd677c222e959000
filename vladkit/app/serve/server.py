"""Serving an application of :func:`vladkit.app.serve.web.create_app` with uvicorn:
:func:`run`, :func:`serve_in_thread`, and the guards on connections.

Connections, served by :func:`run` or :func:`serve_in_thread`: a request's headers must
arrive within ``header_timeout`` and its body within the request's time limit, or the
connection is closed; one client holds at most ``max_connections_per_client`` at once.
Without that, uvicorn waits for a request forever, and 256 idle sockets (its
``limit_concurrency``) had every other client answered 503.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from contextlib import contextmanager

import h11
import numpy as np
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .service import DEFAULT_TIMEOUT

__all__ = ["run", "serve_in_thread"]

#: Default cap on the connections one client (one address; an IPv6 /64) holds open at once:
#: a browser opens at most 6 to a server; uvicorn's limit on all of them is 256.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 16
#: Default time a connection has to send a request's complete headers, in seconds.
DEFAULT_HEADER_TIMEOUT = 10.0

#: Seconds an application still answering gets, once a request body is overdue, to send
#: its own answer (this service's reads the body within the same limit, and answers 408).
_BODY_GRACE = 1.0


def _client_key(address):
    """Whom a connection counts against: its IPv4 address, or the /64 network of an IPv6
    one (one subscriber's usual allocation: counted per address, a single client would
    get a cap per address it can pick)."""
    if ":" not in address:  # IPv4, already in its one written form: the usual case, kept cheap
        return address
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope ("fe80::1%eth0") is not a client
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _raw_error(status, reason, message, headers=()):
    """A complete HTTP/1.1 answer carrying this service's JSON error, for a connection the
    protocol refuses before (or without) a request that an application could answer."""
    body = json.dumps({"error": message}, ensure_ascii=True).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", "cache-control: no-store", "x-content-type-options: nosniff", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, guarded against clients that hold connections open.

    uvicorn waits for a request without a time limit, and answers 503 to everyone once
    ``limit_concurrency`` connections are open: 256 sockets that send nothing lock a
    server out. So:

    * at most ``max_per_client`` connections are open at once from one client (an
      address; an IPv6 client: its /64); one more is answered 503 and closed at once;
    * a request's headers must be complete within ``header_timeout`` seconds of the
      connection's opening (or, on a kept-alive connection, of the request's first byte),
      its body within ``body_timeout`` seconds of the headers; past that the connection
      is closed (with a 408 if part of the request came). An application still answering
      when the body is overdue gets ``_BODY_GRACE`` seconds to send its own answer first.

    Between requests, uvicorn's keep-alive timeout applies as before. The limits, and the
    count of open connections per client shared by a server's connections, are class
    attributes of the subclass :func:`_guarded_protocol` makes for each server; they are
    only touched from the server's event loop, so they need no lock.
    """

    max_per_client = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    header_timeout = DEFAULT_HEADER_TIMEOUT
    body_timeout = DEFAULT_TIMEOUT
    open_per_client = None  # {client: open connections}, one dict per server
    refusal = b""  # the answer to a connection over the cap, made once per server

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._counted_as = None  # the client this connection counts against, once counted
        self._timer = None
        self._phase = None  # what the timer waits for: "headers" or "body"
        self._grace = False

    # -- the cap -------------------------------------------------------------------------

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.max_per_client and self.client:
            client = _client_key(self.client[0])
            if self.open_per_client.get(client, 0) >= self.max_per_client:
                # Out of uvicorn's count at once, not when the close completes: a burst of
                # refused connections must not push the others past limit_concurrency.
                self.connections.discard(self)
                transport.write(self.refusal)
                transport.close()
                return
            self.open_per_client[client] = self.open_per_client.get(client, 0) + 1
            self._counted_as = client
        self._arm(self.header_timeout, "headers")

    def connection_lost(self, exc):
        self._disarm()
        if self._counted_as is not None:
            left = self.open_per_client[self._counted_as] - 1
            if left:
                self.open_per_client[self._counted_as] = left
            else:
                del self.open_per_client[self._counted_as]
            self._counted_as = None
        super().connection_lost(exc)

    # -- the timeouts --------------------------------------------------------------------

    def data_received(self, data):
        if self._timer is None and self.conn.their_state is h11.IDLE:
            # The first bytes of the next request on a kept-alive connection.
            self._arm(self.header_timeout, "headers")
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self):
        super().on_response_complete()
        # A pipelined request may have started with the next cycle.
        self._follow_request()

    def _follow_request(self):
        """Move the timer with the request: the body's deadline once the headers are in,
        none once the request is complete (or the connection is ending)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm(self.body_timeout, "body")
        elif state is h11.IDLE:
            if self._timer is None and self.conn.trailing_data[0]:
                self._arm(self.header_timeout, "headers")
        else:
            self._disarm()

    def _arm(self, seconds, phase):
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)
        self._phase, self._grace = phase, False

    def _disarm(self):
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self):
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body" and self.cycle is not None and not self.cycle.response_complete \
                and not self._grace:
            self._grace = True
            self._timer = self.loop.call_later(_BODY_GRACE, self._expired)
            return
        if self._phase == "headers" and self.conn.trailing_data[0]:
            # Part of a request came: say why it is dropped (a silent close is for idle ones).
            self.transport.write(_raw_error(408, "Request Timeout", "the request's headers did not arrive within "
                                            f"this server's limit of {self.header_timeout:g} s"))
        self.transport.close()


def _guarded_protocol(max_per_client, header_timeout, body_timeout):
    """A :class:`_GuardedH11Protocol` subclass for one server, with its limits and its own
    count of connections per client."""
    if not isinstance(max_per_client, (int, np.integer)) or isinstance(max_per_client, bool) or max_per_client < 0:
        raise ValueError(f"max_connections_per_client must be a non-negative integer (0: no cap), "
                         f"got {max_per_client!r}")
    for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    # Made once: a client over its cap may open connections by the thousand.
    refusal = _raw_error(503, "Service Unavailable", f"too many connections from your address ({max_per_client} "
                         "are open): close some, or retry in a moment", ("retry-after: 1",))
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {
        "max_per_client": int(max_per_client), "header_timeout": float(header_timeout),
        "body_timeout": float(body_timeout), "open_per_client": {}, "refusal": refusal})


def _uvicorn_config(app, host, port, quiet, limit_concurrency, max_connections_per_client, header_timeout,
                    body_timeout, **options):
    if body_timeout is None:
        # The app's own limit on a request (create_app's timeout), which its body reads obey.
        body_timeout = getattr(getattr(app, "state", None), "limits", {}).get("timeout", DEFAULT_TIMEOUT)
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning" if quiet else "info", access_log=not quiet,
        lifespan="off", server_header=False,
        # h11, pinned (not "auto", which would take httptools where installed): the
        # guards against idle and slow connections are built on it.
        http=_guarded_protocol(max_connections_per_client, header_timeout, body_timeout),
        # No WebSocket routes: an upgrade request is plain HTTP (a protocol switched away
        # from would take its connection out of the guards' count).
        ws="none",
        # Open connections beyond this get 503 from uvicorn itself: with max_queue, a
        # bound on the memory that slow or many clients can hold.
        limit_concurrency=limit_concurrency, timeout_keep_alive=5, **options)


def _raise_open_files_limit(wanted=65536):
    """Raise this process's soft limit on open files towards its hard limit.

    asyncio accepts the waiting connections in batches, before their protocols run: a
    burst of them (a client's connections over its cap included, refused an instant
    later) holds one file each for that instant. At the usual soft limit, 1,024, such a
    burst runs it out, and asyncio then stops accepting anyone for a second.
    """
    try:
        import resource
    except ImportError:  # not on Windows, which has no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # refused (macOS caps it below its hard limit): serve anyway
            pass


def run(app, *, host="127.0.0.1", port=8000, quiet=False, limit_concurrency=256,
        max_connections_per_client=DEFAULT_MAX_CONNECTIONS_PER_CLIENT, header_timeout=DEFAULT_HEADER_TIMEOUT,
        body_timeout=None):
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C or SIGTERM).

    Parameters
    ----------
    app : ASGI application (from :func:`create_app`)
    host : str, default "127.0.0.1"
        This machine only; "0.0.0.0" listens on every interface (give ``create_app`` the
        ``allowed_hosts`` clients will use then).
    port : int, default=8000
    quiet : bool
        No access log, only warnings and errors.
    limit_concurrency : int, default=256
        Connections at once; uvicorn answers 503 beyond.
    max_connections_per_client : int, default=16
        Connections one client (an address; an IPv6 client: its /64) may hold open at once;
        one more is answered 503 and closed at once. 0: no cap (behind a reverse proxy,
        every client has the proxy's address: let the proxy cap them).
    header_timeout : float, default=10
        Seconds a connection has to send a request's complete headers, from its opening
        (or, between kept-alive requests, from the request's first byte); past it the
        connection is closed.
    body_timeout : float or None, default=None
        Seconds a request's body has to arrive once the headers are in; past it the
        connection is closed. None: the app's own time limit (``create_app``'s
        ``timeout``, 30 s by default), within which it answers 408 itself.

    Raises
    ------
    ValueError
        A limit is not a positive number (``max_connections_per_client``: not a
        non-negative integer).

    Notes
    -----
    Serving is the process's job then: its soft limit on open files is raised towards the
    hard limit (at most 65,536), so that a burst of connections cannot run it out.
    """
    config = _uvicorn_config(app, host, port, quiet, limit_concurrency, max_connections_per_client, header_timeout,
                             body_timeout)
    _raise_open_files_limit()
    uvicorn.Server(config).run()


@contextmanager
def serve_in_thread(app, *, host="127.0.0.1", port=0, quiet=True, limit_concurrency=256,
                    max_connections_per_client=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                    header_timeout=DEFAULT_HEADER_TIMEOUT, body_timeout=None):
    """Serve ``app`` with uvicorn in a background thread for the duration of the block.

    For tests, notebooks and benchmarks. ``port=0`` takes a free port; the block gets the
    base URL (``http://127.0.0.1:PORT``). The server stops, its connections closed, when
    the block ends. The other parameters are :func:`run`'s.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        # log_config=None: the process's logging is the caller's, not reconfigured.
        server = uvicorn.Server(_uvicorn_config(app, host, port, quiet, limit_concurrency, max_connections_per_client,
                                                header_timeout, body_timeout, log_config=None))
    except BaseException:  # a limit refused (ValueError), or the port taken
        sock.close()
        raise
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="vladkit-serve")
    thread.start()
    try:
        started = time.monotonic()
        while not server.started:
            if not thread.is_alive() or time.monotonic() - started > 30:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
