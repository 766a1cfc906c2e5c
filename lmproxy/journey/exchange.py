"""The attempt that relays: one response from an upstream connection to the client.

From the send on, the upstream connection feeds an :class:`Exchange` the
response head and, once per backend read, the body bytes as they came, which it
writes to the client in one write (a chunked body passes with its own framing;
only a close-delimited one is framed here). Once the response head is written,
a failure ends the stream with an SSE error event (or a cut connection, for a
body that cannot carry one). Before it, a 5xx or 429 head may be dropped,
unrelayed, for another service's answer (``--retry-on-5xx``) or the model's
fallback. An outcome settles once; the end and what follows run from a
``call_soon`` (never inside a parser callback), except a completed response's,
which the upstream connection reports last.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from lmproxy.backend.upstream import (
    EVENT_STREAM,
    HOP_LINES,
    LENGTH,
    NO_BODY,
    TRANSFER_ENCODING,
    UNTIL_CLOSE,
    UpstreamConnection,
)
from lmproxy.errors import sse_error_event
from lmproxy.fleet.breaker import SERVER_ERRORS
from lmproxy.journey.attempt import (
    BYTES_PER_TOKEN,
    HOP_BY_HOP,
    Attempt,
    Outcome,
    connection_names,
    prompt_estimate,
    request_data,
)
from lmproxy.telemetry.metrics import whole_usage_tokens

if TYPE_CHECKING:
    from lmproxy.journey.attempt import Journey


def _header_lines(names: frozenset[bytes]) -> re.Pattern[bytes]:
    """Header lines named ``names``, each with the CRLF before it, in a response head."""
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    return re.compile(rb"\r\n(?:%s)[ \t]*:[^\r]*" % alternatives, re.I)


# The response head's lines to drop; a chunked body relayed as the backend framed
# it keeps its Transfer-Encoding.
_HOP_BY_HOP_FIELDS = _header_lines(HOP_BY_HOP)
_HOP_BY_HOP_BUT_TE = _header_lines(HOP_BY_HOP - {b"transfer-encoding"})
_named_lines_cache: dict[frozenset[bytes], re.Pattern[bytes]] = {}
# The framing lines of the client's head, by (framed here, kept alive).
_FRAMING_LINES = {
    (False, True): b"",
    (False, False): b"Connection: close\r\n",
    (True, True): b"Transfer-Encoding: chunked\r\n",
    (True, False): b"Transfer-Encoding: chunked\r\nConnection: close\r\n",
}
# Answered before any byte, these are dropped for another service's (--retry-on-5xx);
# a 429 is "busy": retried, never a breaker's step.
RETRIED_STATUSES = SERVER_ERRORS | {429}
TAIL_BYTES = 4096  # of a response kept for its usage object


def drop_named(fields: bytes, connection: bytes) -> bytes:
    """A response head's fields less the ones its ``Connection`` header names."""
    names = connection_names(connection)
    if not names:
        return fields
    pattern = _named_lines_cache.get(names)
    if pattern is None:
        pattern = _header_lines(names)
        if len(_named_lines_cache) < 256:
            _named_lines_cache[names] = pattern
    return pattern.sub(b"", fields)


class Exchange(Attempt):
    """Relays one response from an upstream connection to the client connection."""

    __slots__ = (
        "_chunked",
        "_frame",
        "_framing",
        "_out",
        "_sse",
        "_tail",
        "_tail_prev",
        "bytes_out",
        "client",
        "head_sent",
    )

    def _begin(self, journey: Journey) -> None:
        self.client = journey.client
        self.head_sent = False
        self._out: list[bytes] = []
        self._chunked = False  # the client gets a chunked body
        self._frame = False  # ... which is framed here (the backend's was close-delimited)
        # self._framing: the backend's, from its head on
        self._sse = False
        # The last two body pieces: where the backend's usage object is, for metrics.
        self._tail = b""
        self._tail_prev = b""
        self.bytes_out = 0

    def send(self, conn: UpstreamConnection) -> None:
        # Attempt._sending, inline: this is every request's path.
        self.conn = conn
        self.sent_at = time.perf_counter()
        self.sent_tick = conn.loop.time()
        self.strategy.on_start(self.service, self.route)
        journey = self.journey
        request = journey.request
        data = request_data(self.service, request, self.route.body, journey.forward_extra)
        journey.router.metrics.added.observe(time.perf_counter() - request.received_at)
        conn.send(self, data, request.method == b"HEAD", request.http_minor == 0)
        if self.client.flow.write_paused:
            conn.pause_reading()

    # --- Sink: called by the upstream connection --------------------------------

    def on_head(self, status: int, head: bytes, framing: int) -> None:
        if status >= 429 and self._drops(status):  # a 200 pays this one comparison
            return
        self.status = status
        self._framing = framing
        self.ttfb_s = time.perf_counter() - self.sent_at
        self.strategy.on_first_byte(self.service, self.route, self.ttfb_s)
        client = self.client
        request = client.current
        assert request is not None
        keep_alive = request.keep_alive and not client.closing
        # A chunked body passes as the backend framed it (the Transfer-Encoding
        # header with it); a close-delimited one is framed here, once per read.
        if framing in (LENGTH, NO_BODY):
            self._chunked = False
        elif request.http_minor >= 1:
            self._chunked = True
            self._frame = framing == UNTIL_CLOSE
        else:
            keep_alive = False  # an HTTP/1.0 client learns the end from the close
        request.keep_alive = keep_alive
        # The head as the backend sent it, less the headers of its own connection;
        # the status line says HTTP/1.1 whatever the backend spoke.
        eol = head.find(b"\r\n")
        line = head[:eol] if head.startswith(b"HTTP/1.1 ") else b"HTTP/1.1" + head[8:eol]
        fields = head[eol:-4]  # each header preceded by its CRLF
        conn = self.conn
        assert conn is not None
        marks = conn.marks
        if marks & (HOP_LINES | TRANSFER_ENCODING):
            fields = self._own_lines_dropped(fields, conn, marks)
        self._sse = bool(marks & EVENT_STREAM)
        out = [line, fields, b"\r\n", _FRAMING_LINES[self._frame, keep_alive]]
        if self.journey.head_extra:
            out.append(self.journey.head_extra)
        out.append(b"\r\n")
        self._out.append(b"".join(out))
        self.head_sent = True

    def _own_lines_dropped(self, fields: bytes, conn: UpstreamConnection, marks: int) -> bytes:
        """The head's fields less its hop-by-hop lines and those its Connection names; a
        chunked body relayed as the backend framed it keeps its Transfer-Encoding."""
        keeps_te = self._chunked and not self._frame
        if keeps_te and not marks & HOP_LINES:
            return fields  # its one such line is the Transfer-Encoding it keeps
        if conn.connection is not None:
            fields = drop_named(fields, conn.connection)
        hop = _HOP_BY_HOP_BUT_TE if keeps_te else _HOP_BY_HOP_FIELDS
        return hop.sub(b"", fields)

    def _drops(self, status: int) -> bool:
        """Whether this error answer is dropped, unrelayed, because something else may
        answer instead (nothing has reached the client yet): another service of the
        model (--retry-on-5xx, within --retries), else the model's next fallback. The
        connection goes with it: its body is never read."""
        journey = self.journey
        if (
            status in RETRIED_STATUSES
            and journey.router.config.retry_on_5xx
            and self.owner.may_retry(self.service)
        ):
            outcome = Outcome.RETRIED
        elif journey.fallbacks and (status == 429 or status == 503):
            outcome = Outcome.FALLBACK
        else:
            return False
        self.status = status
        self.reason = f"answered {status}"
        self.conn.close()  # type: ignore[union-attr]
        self._settle(outcome)
        return True

    def on_body(self, data: bytes) -> None:
        self._tail_prev = self._tail
        self._tail = data
        if self._frame:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.bytes_out += len(data)
            self.client.write(data)
            out.clear()

    def on_complete(self, reusable: bool) -> None:
        if self._frame:
            self._out.append(b"0\r\n\r\n")
        self.flush()
        self.reusable = reusable
        if self.outcome is None:
            # The upstream connection is done with this exchange (it calls this last):
            # the end comes at once, without a turn of the loop.
            self.outcome = Outcome.DONE
            self.owner.finish(self)

    def on_error(self, exc: Exception) -> None:
        """A callback of this exchange (or the connection's own code) raised while the
        backend's bytes were parsed: not the backend's fault, and the end of the request."""
        self.journey.crash(exc, self)

    def on_lost(self, reason: str, broken: bool) -> None:
        self.reason = reason
        conn = self.conn
        assert conn is not None
        if self.head_sent:
            self._cut(reason)
        elif broken:
            self._settle(Outcome.BROKEN)
        elif conn.reused and not conn.received_any:
            self._settle(Outcome.STALE)
        else:
            self._settle(Outcome.DROPPED)

    # --- events from the client side, the pair and the clock ---------------------

    def cancel(self) -> None:
        """The client hung up: stop the backend's work at once, never pool the socket."""
        if self.conn is None:
            self.let_go()  # still connecting
            return
        self.conn.close()
        self._settle(Outcome.CLIENT_GONE)

    def partner_failed(self, reason: str) -> None:
        """The prefill of this decode failed before the decode answered (pair.py): it
        ends here, and the pair reports the prefill's failure instead."""
        self.reason = reason
        if self.outcome is None:
            self.outcome = Outcome.PARTNER if self.conn is not None else Outcome.LET_GO
            task = self.connecting
            if task is not None:
                task.cancel()
            if self.conn is not None:
                self.conn.close()
        self.end()

    def stop(self, reason: str) -> bool:
        """The journey crashed: end here, since no finish follows; a stream whose head
        the client has ends as a cut one does. Whether the client has the head."""
        if self.outcome is None:
            if self.head_sent:
                self._end_stream(reason)
        elif self.head_sent:
            self.client.close()  # complete, or already cut: nothing may follow it
        Attempt.stop(self, reason)
        return self.head_sent

    def pause(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    @property
    def tail(self) -> bytes:
        """The response's last bytes (at most TAIL_BYTES): where ``usage`` is."""
        last = self._tail
        if len(last) >= TAIL_BYTES:
            return last[-TAIL_BYTES:]
        return self._tail_prev[-(TAIL_BYTES - len(last)) :] + last

    def tokens_used(self, body: bytes, metered: bool) -> tuple[int, int] | None:
        """Its usage: as answered, or from the tail an answer cut short ended with; a
        tpm key's answer without one is estimated (an error answer costs nothing)."""
        outcome = self.outcome
        if outcome is Outcome.DONE:
            tokens = self.tokens
            if tokens == (0, 0):  # OpenAI's "usage": null alone
                tokens = None
        elif outcome is Outcome.CUT or outcome is Outcome.CLIENT_GONE:
            tokens = whole_usage_tokens(self.tail)
        else:
            return None
        if tokens is None and metered and self.status < 400:
            return self.estimate(body)
        return tokens

    def estimate(self, body: bytes) -> tuple[int, int]:
        """(prompt, completion) tokens this answer to ``body`` cost, as far as can be
        told without its usage: a MeteredExchange counts what it relayed."""
        return prompt_estimate(body)

    def check_timeout(self, now: float) -> None:
        """Called by the router's sweep: give up on a silent backend."""
        conn = self.conn
        if self.outcome is not None or conn is None:
            return
        if not self.head_sent:
            if now - self.sent_tick >= self.timeout_s:
                self.reason = f"no response from the backend within {self.timeout_s:g}s"
                conn.close()
                self._settle(Outcome.TIMEOUT)
            return
        # Waiting on a slow client is not the backend's silence (and resuming restarts
        # the count: UpstreamConnection.resume_reading).
        if not self.client.flow.write_paused and conn.silent_for(now) >= self.timeout_s:
            conn.close()
            self._cut(f"the backend sent nothing for {self.timeout_s:g}s")

    # --- internals ------------------------------------------------------------

    def _cut(self, reason: str) -> None:
        """End a response the backend broke off after its head reached the client."""
        self.reason = reason
        self._end_stream(reason)
        self._settle(Outcome.CUT)

    def _end_stream(self, reason: str) -> None:
        """The error event, where the stream can carry one; then the close."""
        # A chunk of our own can follow only a complete chunk of the backend's.
        conn = self.conn
        assert conn is not None
        if (
            self._sse
            and self._framing != LENGTH
            and (self._frame or not self._chunked or conn.at_chunk_boundary())
        ):
            message = f"the backend failed mid-stream: {reason}"
            event = sse_error_event(message)
            if self._chunked:
                self._out += (b"%x\r\n" % len(event), event, b"\r\n0\r\n\r\n")
            else:
                self._out.append(event)
        self.flush()
        # The body is incomplete or was patched: this connection carries nothing more.
        self.client.close()

    def _settle(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            # Not inline: this may run inside the backend parser's callbacks.
            self.loop.call_soon(self.owner.finish, self)


class MeteredExchange(Exchange):
    """The exchange of a request whose key has a ``tpm``: it also counts what it relays,
    so that an answer that ends without its usage (the client hung up before the usage
    chunk, the backend broke off, or never sends usage) is still charged. Only such
    requests pay for the count: two C-speed scans of each read, never a parse."""

    __slots__ = ("body_bytes", "events")

    def _begin(self, journey: Journey) -> None:
        Exchange._begin(self, journey)
        self.body_bytes = 0
        self.events = 0  # SSE events relayed: each starts a line with "data:"

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        # A raw newline is never inside an event's JSON, so "\ndata:" starts an event
        # (after the blank line before it, or a chunk-size line); a read may begin with one.
        self.events += data.count(b"\ndata:") + data.startswith(b"data:")
        Exchange.on_body(self, data)

    def estimate(self, body: bytes) -> tuple[int, int]:
        completion = self.events if self._sse else self.body_bytes // BYTES_PER_TOKEN
        return prompt_estimate(body)[0], completion
