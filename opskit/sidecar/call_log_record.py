"""One call-log line (format version 1) from what the metering proxy saw of a call. Pure code, no I/O.

The format is documented in docs/call-log.md; the field names are a contract with the readers of the
log (`opskit calllog stats`, `opskit loadtest replay`): add fields, never rename or drop one, and bump
FORMAT_VERSION when a field changes meaning.

Nothing secret is written: the caller is a keyed hash (HMAC-SHA256 with the deployment's key) of
the Authorization header, and the prompt is a chain of keyed block hashes: equal hashes mean equal
prompt prefixes, and without the key nobody can test a guessed text against them. Prompt and
completion text appear only when bodies were asked for (`--call-log-bodies`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

from opskit.core.records import CallRecord
from opskit.core.sse import SSEParser

FORMAT_VERSION = 1
PREFIX_BLOCK_CHARS = 256
HASH_HEX = 16                    # hex digits kept of each hash (64 bits)
MAX_PREFIX_BLOCKS = 4096         # a 1 MiB prompt; longer prompts keep the hashes of their first 1 MiB
MAX_BODY_TEXT = 1024 * 1024      # completion characters kept with --call-log-bodies


def iso_ms(ts: float) -> str:
    """UTC time with millisecond precision: 2026-12-01T09:13:44.123Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def caller(auth: str | None, key: bytes) -> str | None:
    """The caller fingerprint: HMAC-SHA256(key, Authorization header), 16 hex; None without a header."""
    if not auth:
        return None
    return hmac.new(key, auth.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:HASH_HEX]


def _text(content) -> str:
    """The text of a message's content: a string, or the `text` of its parts (images etc. add nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_text(req: dict) -> str:
    """The prompt as the proxy sees it: the concatenated contents of `messages` (chat), else `prompt`
    (completions; a list of strings is concatenated)."""
    messages = req.get("messages")
    if isinstance(messages, list):
        return "".join(_text(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = req.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "".join(p for p in prompt if isinstance(p, str))
    return ""


def prefix_hashes(text: str, key: bytes, block: int = PREFIX_BLOCK_CHARS) -> list[str]:
    """Chained hashes of the full `block`-character blocks of `text`: hash i covers text[:block*(i+1)],
    so two prompts share their first k hashes exactly when they share their first k blocks. Keyed with
    the deployment's key; a trailing partial block has no hash."""
    state = hmac.new(key, b"opskit-call-log-prefix-v1", hashlib.sha256).digest()
    out = []
    for i in range(min(len(text) // block, MAX_PREFIX_BLOCKS)):
        state = hashlib.sha256(state + text[i * block:(i + 1) * block].encode("utf-8", "surrogatepass")).digest()
        out.append(state.hex()[:HASH_HEX])
    return out


def _int(value) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _completion_text(obj) -> str:
    """content (and reasoning_content) of a non-streamed response's first choice."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    msg = choice.get("message")
    if isinstance(msg, dict):
        return "".join(t for t in (msg.get("reasoning_content"), msg.get("content")) if isinstance(t, str))
    return choice["text"] if isinstance(choice.get("text"), str) else ""


def _stream_text(pieces: list[bytes]) -> str:
    """The generated text of a captured event stream (first choice's deltas, reasoning included)."""
    parser, out, size = SSEParser(), [], 0
    for payload in [*parser.feed(b"".join(pieces)), *parser.close()]:
        try:
            obj = json.loads(payload)
        except ValueError:
            continue
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            continue
        delta = choices[0].get("delta")
        parts = (delta.get("reasoning_content"), delta.get("content")) if isinstance(delta, dict) else \
            (choices[0].get("text"),)
        for t in parts:
            if isinstance(t, str) and size < MAX_BODY_TEXT:
                out.append(t)
                size += len(t)
    return "".join(out)[:MAX_BODY_TEXT]


def completion(streamed: bool, pieces: list[bytes] | None) -> str | None:
    """The completion text of a captured response body (None when nothing was captured)."""
    if pieces is None:
        return None
    if streamed:
        return _stream_text(pieces)
    try:
        return _completion_text(json.loads(b"".join(pieces)))[:MAX_BODY_TEXT]
    except (ValueError, RecursionError):
        return None


def build(rec: CallRecord, ts: float, target: str, model: str | None, request_body: bytes | None,
          auth: str | None, key: bytes, response: list[bytes] | None = None, bodies: bool = False) -> dict:
    """The record of one call: a dict that json.dumps writes as one line of the log."""
    try:
        req = json.loads(request_body) if request_body else None
    except (ValueError, RecursionError):
        req = None
    req = req if isinstance(req, dict) else {}
    text = prompt_text(req)
    stream = req.get("stream")
    usage = rec.tokens_from_usage
    tokens = {"input": rec.input_tokens if usage else None,
              "cached_input": rec.cached_input_tokens if usage else None,
              "output": rec.output_tokens if usage or rec.output_tokens else None,
              "reasoning": rec.reasoning_tokens if usage else None}
    out = {
        "v": FORMAT_VERSION, "ts": iso_ms(ts), "target": target, "model": model,
        "stream": stream if isinstance(stream, bool) else rec.streamed, "status": rec.code,
        "error_type": rec.error_type or None, "duration_s": round(rec.duration_s, 6),
        "ttft_s": None if rec.ttft_s is None else round(rec.ttft_s, 6),
        "tpot_s": None if rec.tpot_s is None else round(rec.tpot_s, 6),
        "tokens": tokens, "tokens_from_usage": usage,
        "max_tokens": _int(req.get("max_tokens")) if "max_tokens" in req else _int(req.get("max_completion_tokens")),
        "request_id": rec.request_id, "caller": caller(auth, key),
        "prompt_chars": len(text), "prefix_block_chars": PREFIX_BLOCK_CHARS,
        "prefix_hashes": prefix_hashes(text, key),
    }
    if bodies:
        prompt = req.get("messages") if "messages" in req else req.get("prompt")
        out["body"] = {"messages" if "messages" in req else "prompt": prompt,
                       "completion": completion(rec.streamed, response)}
    return out
