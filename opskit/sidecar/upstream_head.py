"""The head of an upstream's HTTP/1.1 response, parsed strictly and in one pass (opskit.sidecar.
upstream_protocol's Conn calls `parse_head` once the head is complete): what to relay, what to meter,
how the body is framed.
"""

from __future__ import annotations

import re

# Hop-by-hop fields (RFC 9110 7.6.1): never relayed; a relay states the framing (Content-Length) itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
NOT_RELAYED = HOP_BY_HOP | {"content-length"}
_FRAMING = frozenset({"transfer-encoding", "content-length", "connection"})
# The fields whose values the proxy reads (metering: type, coding, request id, rate limits; framing).
READ = frozenset({"content-type", "content-encoding", "x-request-id", "x-ratelimit-remaining-requests",
                  "x-ratelimit-remaining-tokens"}) | NOT_RELAYED
_RELAY, _READ_AND_RELAY, _DROP = range(3)  # what becomes of a field line, by its name

# What may not appear in a head: control characters but tab, CR and LF (those only as CRLF line ends).
_CONTROLS_CR_LF = bytes([*range(0x09), *range(0x0a, 0x20), 0x7f])
_STATUS = re.compile("[1-5][0-9][0-9]")
_TOKEN = re.compile("[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# header names already checked against _TOKEN: (lower case, what becomes of the line) (bounded)
_NAMES: dict[str, tuple[str, int]] = {}


def parse_head(head: bytes) -> tuple[int, str, str, dict[str, str], list[str], dict[str, str]]:
    """(status, reason, version, low, lines, framing) of a response head without its final CRLFCRLF, in
    one pass: `low` the first value of each field in READ by lower-case name (only those: a value
    nobody reads is not cut out and stripped), `lines` the end-to-end header lines as
    they came (hop-by-hop fields and Content-Length left out), `framing` the last Transfer-Encoding,
    Content-Length and Connection values.

    Strict where a lenient parse would relay something else than what was sent: a bare LF or CR (a
    header smuggled inside another one's value), any other control character, bytes that are not
    UTF-8, a header name that is not a token, a status that is not three digits in 100-599.
    ValueError (UnicodeDecodeError is one) for any of those."""
    # Two C passes: every CR and LF deleted here belongs to a CRLF pair, and nothing else is deleted.
    if len(head.translate(None, _CONTROLS_CR_LF)) != len(head) - 2 * head.count(b"\r\n"):
        raise ValueError("bare LF/CR or control character")
    text = head.decode("utf-8")
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not _STATUS.fullmatch(parts[1]):
        raise ValueError("status line")
    low: dict[str, str] = {}
    relayed: list[str] = []
    framing: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        known = _NAMES.get(name)
        if known is None:  # an upstream sends the same few names again and again
            if not sep or not _TOKEN.fullmatch(name):
                raise ValueError("header line")
            lname = name.lower()
            known = lname, _DROP if lname in NOT_RELAYED else _READ_AND_RELAY if lname in READ else _RELAY
            if len(_NAMES) < 1024:
                _NAMES[name] = known
        elif not sep:
            raise ValueError("header line")
        lname, fate = known
        if fate == _RELAY:
            relayed.append(line)
            continue
        value = value.strip(" \t")
        if lname not in low:
            low[lname] = value
        if fate == _READ_AND_RELAY:
            relayed.append(line)
        elif lname in _FRAMING:
            framing[lname] = value
    return int(parts[1]), parts[2] if len(parts) > 2 else "", parts[0], low, relayed, framing
