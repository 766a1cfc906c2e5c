"""Logging set-up: every record is one line, whatever a peer put into it.

Service names, model ids, paths and header values come from clients, backends
and registries. A CR or LF among them would start a line of the attacker's
choosing in the log (log forging), so the formatter escapes control characters
in every message; a traceback, which is ours, keeps its lines. A URL's password
is masked wherever a URL is shown.
"""

from __future__ import annotations

import datetime
import logging
import re
from urllib.parse import urlsplit

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """``text`` with control characters written as escapes, so it stays one line."""
    return _CONTROL.sub(_escape, text)


def printable(raw: bytes) -> str:
    """Bytes from a peer (a path, a method), for a message or a log line."""
    return one_line(raw.decode("utf-8", "replace"))


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in the message; the traceback is left as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def configure(level: str, fmt: str) -> None:
    """The process's logging: one handler on stderr with the one-line formatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def masked_url(url: str) -> str:
    """``url`` with the password of a ``user:password@`` part masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


def iso_time(ts: float | None) -> str | None:
    """An epoch time as the API shows it: local ISO 8601, to the second."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds")
