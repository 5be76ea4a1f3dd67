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

# What may not appear in a head: control characters but tab, CR and LF (those only as CRLF line ends).
_CONTROLS = bytes([*range(0x09), 0x0b, 0x0c, *range(0x0e, 0x20), 0x7f])
_STATUS = re.compile("[1-5][0-9][0-9]")
_TOKEN = re.compile("[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LOWER: dict[str, str] = {}  # header names already checked against _TOKEN, to their lower case (bounded)


def parse_head(head: bytes) -> tuple[int, str, str, dict[str, str], list[str], dict[str, str]]:
    """(status, reason, version, low, lines, framing) of a response head without its final CRLFCRLF, in
    one pass: `low` each header's first value by lower-case name, `lines` the end-to-end header lines as
    they came (hop-by-hop fields and Content-Length left out), `framing` the last Transfer-Encoding,
    Content-Length and Connection values.

    Strict where a lenient parse would relay something else than what was sent: a bare LF or CR (a
    header smuggled inside another one's value), any other control character, bytes that are not
    UTF-8, a header name that is not a token, a status that is not three digits in 100-599.
    ValueError (UnicodeDecodeError is one) for any of those."""
    crlf = head.count(b"\r\n")  # C loops over bytes: a regex with lookarounds here cost ~3 % of a request
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf or len(head.translate(None, _CONTROLS)) != len(head):
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
        lname = _LOWER.get(name)
        if lname is None:  # an upstream sends the same few names again and again
            if not sep or not _TOKEN.fullmatch(name):
                raise ValueError("header line")
            lname = name.lower()
            if len(_LOWER) < 1024:
                _LOWER[name] = lname
        elif not sep:
            raise ValueError("header line")
        value = value.strip(" \t")
        if lname not in low:
            low[lname] = value
        if lname not in NOT_RELAYED:
            relayed.append(line)
        elif lname in _FRAMING:
            framing[lname] = value
    return int(parts[1]), parts[2] if len(parts) > 2 else "", parts[0], low, relayed, framing
