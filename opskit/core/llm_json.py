"""What an OpenAI-style response says about itself, read from its JSON: a stream chunk's text, error and
`usage`, a non-streamed body's text and usage, a response id. Pure code, no I/O.

The usual shapes are decoded with msgspec into structs that hold only the fields metering reads (the
rest is checked as JSON and skipped, ~4x cheaper than a full parse); any other shape goes through the
full parse (`json`) and is read as the same struct. Any value may be garbage: a `usage` that is not a
sane integer is ignored (tokens unknown), never an exception.
"""

from __future__ import annotations

import json
from json.scanner import make_scanner
from typing import Any, NamedTuple

import msgspec

MAX_ID_CHARS = 100        # a response id longer than this is cut (it labels an exemplar: 128 characters at most)
MAX_TOKENS = 10 ** 9      # a usage count above this is garbage (no context window is within 1000x of it)
_scan = make_scanner(json.JSONDecoder())  # the C scanner without json.loads' wrappers (per chunk)


def _loads(payload: str):
    """json.loads for one event payload, ~1 us cheaper: scan one value, allow only trailing space."""
    try:
        obj, end = _scan(payload, 0)
    except StopIteration:  # leading whitespace or no value: let json.loads decide
        return json.loads(payload)
    except RecursionError:  # nested deeper than the interpreter's stack: not a chunk anyone sends
        raise ValueError("JSON nested too deep") from None
    if end != len(payload) and payload[end:].strip():
        raise ValueError("extra data after the JSON value")
    return obj


def loads_utf8(data: bytes):
    """json.loads of a UTF-8 body without json.loads' encoding sniffing (~2 us a call); other encodings
    and a BOM go through json.loads as before. ValueError / RecursionError as json.loads."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return json.loads(data)
    return json.loads(data) if text[:1] == "\ufeff" else _loads(text)


class _Text(msgspec.Struct, gc=False):
    """A chunk's `delta` or a response's `message`: the text metering looks for."""

    content: Any = None
    reasoning_content: Any = None


class _Choice(msgspec.Struct, gc=False):
    delta: _Text | None = None
    text: Any = None  # /v1/completions streams carry `text`


class _Chunk(msgspec.Struct, gc=False):  # (no cycles in decoded JSON: untracked)
    """The fields of a stream chunk that metering reads; the others are checked as JSON and skipped."""

    id: Any = None
    choices: list[_Choice] | None = None
    usage: Any = None
    error: Any = None


decode_chunk = msgspec.json.Decoder(_Chunk).decode


def chunk_of_any(payload: str) -> _Chunk | None:
    """A payload `_Chunk` does not describe, parsed in full as json.loads reads it, as the `_Chunk` it
    amounts to (choices that are not objects skipped, a `delta` that is not an object read as none);
    None when it is not JSON or not an object."""
    try:
        obj = _loads(payload)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return None
    if type(obj) is not dict:  # (json makes plain dicts)
        return None
    choices = obj.get("choices")
    choices = [_Choice(_text_of(c.get("delta")), c.get("text")) for c in choices if type(c) is dict] \
        if type(choices) is list else None
    return _Chunk(obj.get("id"), choices, obj.get("usage"), obj.get("error"))


def _text_of(obj) -> _Text | None:
    """A full parse's `delta` or `message` as `_Text` (none when it is not an object)."""
    return _Text(obj.get("content"), obj.get("reasoning_content")) if type(obj) is dict else None


def cut_id(rid) -> str:
    """A response id as an exemplar label may carry it: cut to MAX_ID_CHARS; "" when it is no string."""
    return rid[:MAX_ID_CHARS] if isinstance(rid, str) else ""


def _count(value) -> int | None:
    """A token count from `usage`: an int (a bool is not one) in 0..MAX_TOKENS; None for missing."""
    if value is None:
        return 0
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return None


def _part(usage: dict, whole: int, *paths: tuple[str, ...]) -> int:
    """A part of `whole` (cached input, reasoning output) at the first of `paths` present; 0 (unknown)
    when it is garbage or larger than the whole it is part of."""
    for path in paths:
        value = usage
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            n = _count(value)
            return n if n is not None and n <= whole else 0
    return 0


def usage_counts(usage) -> tuple[int, int, int, int] | None:
    """(prompt, completion, cached prompt, reasoning) tokens of a `usage` object; None when there is
    none or its prompt/completion counts are garbage (`"x"`, Infinity, `[1]`, -1, 1e30, true): the
    call is still counted, its tokens are unknown. Cached input is DeepSeek's
    `prompt_cache_hit_tokens` or OpenAI's `prompt_tokens_details.cached_tokens`; reasoning is
    `completion_tokens_details.reasoning_tokens`. A garbage detail is unknown (0) on its own."""
    if not isinstance(usage, dict):
        return None
    inp, out = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if inp is None or out is None:
        return None
    cached = _part(usage, inp, ("prompt_cache_hit_tokens",), ("prompt_tokens_details", "cached_tokens"))
    reasoning = _part(usage, out, ("completion_tokens_details", "reasoning_tokens"))
    return inp, out, cached, reasoning


class BodyUsage(NamedTuple):
    """What a non-streamed JSON response says about its tokens (see `completion_usage`)."""

    input: int
    output: int
    from_usage: bool
    has_text: bool
    cached: int = 0      # of input, from the provider's prompt cache
    reasoning: int = 0   # of output, spent on reasoning


def completion_usage(body: bytes) -> BodyUsage:
    """From a non-streamed JSON response: input, output, from_usage, has_text, cached, reasoning.
    Never raises, whatever the body holds."""
    return completion_usage_and_id(body)[0]


class _BodyChoice(msgspec.Struct, gc=False):
    message: _Text | None = None
    text: Any = None


class _Body(msgspec.Struct, gc=False):
    """The fields of a non-streamed response that metering reads (the others are checked and skipped)."""

    id: Any = None
    choices: list[_BodyChoice] | None = None
    usage: Any = None


_decode_body = msgspec.json.Decoder(_Body).decode


def completion_usage_and_id(body: bytes) -> tuple[BodyUsage, str]:
    """completion_usage and the response's `id` ("" when none), from one parse. Never raises. The body
    is decoded into `_Body` (only what is read is built); one of another shape is parsed in full."""
    try:
        obj = _decode_body(body)
    except msgspec.MsgspecError:
        obj = _body_of_any(body)
        if obj is None:  # not JSON, or not an object
            return BodyUsage(0, 0, False, False), ""
    has_text = False
    for choice in obj.choices or ():
        msg = choice.message
        if msg is not None and (msg.content or msg.reasoning_content) or choice.text:
            has_text = True
    usage = usage_counts(obj.usage)
    if usage is not None:
        return BodyUsage(usage[0], usage[1], True, has_text, usage[2], usage[3]), cut_id(obj.id)
    return BodyUsage(0, 0, False, has_text), cut_id(obj.id)


def _body_of_any(body: bytes) -> _Body | None:
    """A body `_Body` does not describe, parsed in full as json.loads reads it, as the `_Body` it amounts
    to (choices that are not objects skipped); None when it is not JSON or not an object."""
    try:
        obj = loads_utf8(body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the stack
        return None
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    choices = [_BodyChoice(_text_of(c.get("message")), c.get("text")) for c in choices if type(c) is dict] \
        if isinstance(choices, list) else None
    return _Body(obj.get("id"), choices, obj.get("usage"))
