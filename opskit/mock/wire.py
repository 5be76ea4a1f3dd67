"""What the mock puts on the wire: request validation, response bodies and pre-encoded chunk templates.

Streams are hot: a chunk is `prefix + words + suffix`, where prefix and suffix are encoded once per
request and choice, so no per-chunk dict or json.dumps is made (DESIGN.md, performance notes). The
synthetic words are plain ASCII and need no escaping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from opskit.mock.latency_model import CONTENT, Schedule, estimate_tokens

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: object) -> bytes:
    """Compact JSON bytes."""
    return _dumps(obj).encode()


class BadRequest(ValueError):
    """A malformed request: 400 with an OpenAI-style body; `code` names the problem."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> bytes:
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI and DeepSeek send it."""
    return dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


@dataclass(slots=True)
class GenRequest:
    """The parts of a chat or completions request that the mock acts on."""

    kind: str              # "chat" | "text"
    model: str
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None
    prompt_tokens: int
    stop: tuple[str, ...] = ()   # generation ends before the first of these in the content
    text: str = ""               # the prompt as one string (the engine model's prefix cache reads it)


def _opt(body: dict, key: str, types: tuple, what: str, check=None):
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types or (check and not check(value)):
        raise BadRequest(f"Invalid type or value for '{key}': expected {what}.", param=key)
    return value


def _prompt_text(body: dict, kind: str) -> str:
    if kind == "text":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        raise BadRequest("'prompt' is required: a string or a non-empty list of strings.", param="prompt")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of messages.", param="messages")
    parts: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]: expected an object with a string 'role'.", param="messages")
        content = m.get("content")
        if isinstance(content, list):   # content parts: [{"type": "text", "text": "..."}]
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: expected a string or a list of parts.", param="messages")
        parts.append(content or "")
    return "\n".join(parts)


def parse_request(raw: bytes, kind: str) -> GenRequest:
    """Validate a chat/completions body; BadRequest says what is wrong in one line."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: a string.", param="model")
    text = _prompt_text(body, kind)
    stream = _opt(body, "stream", (bool,), "a boolean") or False
    opts = _opt(body, "stream_options", (dict,), "an object") or {}
    include_usage = opts.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean.", param="stream_options")
    n = _opt(body, "n", (int,), "an integer between 1 and 128", lambda v: 1 <= v <= 128) or 1
    max_tokens = _opt(body, "max_tokens", (int,), "a positive integer", lambda v: v >= 1)
    max_completion = _opt(body, "max_completion_tokens", (int,), "a positive integer", lambda v: v >= 1)
    _opt(body, "temperature", (int, float), "a number between 0 and 2", lambda v: 0 <= v <= 2)
    _opt(body, "top_p", (int, float), "a number between 0 and 1", lambda v: 0 <= v <= 1)
    stop = _opt(body, "stop", (str, list), "a string or a list of up to 4 strings",
                lambda v: isinstance(v, str) or (len(v) <= 4 and all(isinstance(s, str) for s in v)))
    stops = tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)
    return GenRequest(kind, model, stream, include_usage and stream, n, max_tokens or max_completion,
                      estimate_tokens(text), stops, text)


class Encoder:
    """Encodes one request's chunks and bodies; templates are built once per request."""

    def __init__(self, req: GenRequest, rid: str, created: int) -> None:
        self.req, self.rid, self.created = req, rid, created
        self.cached = 0  # prompt tokens served from the context cache (state.context_cache), set at admission
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        head = f'{{"id":"{rid}","object":"{obj}","created":{created},"model":{json.dumps(req.model)},'
        self.head = head.encode()
        if req.stream:   # a whole (non-streamed) body needs no chunk templates
            self._templates(head)

    def _templates(self, head: str) -> None:
        req = self.req
        tail = '"},"logprobs":null,"finish_reason":null}]}'
        if req.kind == "chat":
            self.prefix = [[(head + f'"choices":[{{"index":{i},"delta":{{"{f}":"').encode() for i in range(req.n)]
                           for f in ("content", "reasoning_content")]
            self.suffix = tail.encode()
        else:
            self.prefix = [[(head + f'"choices":[{{"index":{i},"text":"').encode() for i in range(req.n)]] * 2
            self.suffix = ('"' + tail[2:]).encode()

    def text(self, choice: int, kind: int, words: bytes) -> bytes:
        """A chunk carrying generated text (content, reasoning_content or completion text)."""
        return self.prefix[kind][choice] + words + self.suffix

    def role(self, choice: int) -> bytes:
        """The first chunk of a chat stream: the role, no text."""
        return self.head + b'"choices":[{"index":%d,"delta":{"role":"assistant","content":""},' \
            b'"logprobs":null,"finish_reason":null}]}' % choice

    def finish(self, choice: int, reason: str) -> bytes:
        """A choice's last chunk, carrying its finish_reason."""
        if self.req.kind == "chat":
            return self.head + b'"choices":[{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%s"}]}' % (
                choice, reason.encode())
        return self.head + b'"choices":[{"index":%d,"text":"","logprobs":null,"finish_reason":"%s"}]}' % (
            choice, reason.encode())

    def usage_chunk(self, sched: Schedule) -> bytes:
        """The usage-only chunk (`choices: []`) sent when include_usage is asked for."""
        return self.head + b'"choices":[],"usage":' + dumps(self.usage(sched)) + b"}"

    def usage(self, sched: Schedule) -> dict:
        """The usage object, exact for the tokens the schedule streams."""
        p, c = self.req.prompt_tokens, sched.output_tokens
        # DeepSeek's shape: the context cache's hit and miss tokens beside prompt_tokens
        u = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
             "prompt_cache_hit_tokens": self.cached, "prompt_cache_miss_tokens": p - self.cached}
        if sched.reasoning_tokens:
            u["completion_tokens_details"] = {"reasoning_tokens": sched.reasoning_tokens}
        return u

    def finish_reason(self, sched: Schedule, choice: int) -> str:
        """"length" when max_tokens cut the choice, else "stop"."""
        return "length" if sched.lengths[choice] == self.req.max_tokens and not sched.stopped[choice] else "stop"

    def whole(self, sched: Schedule) -> bytes:
        """The non-streamed response body."""
        choices = []
        for i in range(self.req.n):
            fin = self.finish_reason(sched, i)
            if self.req.kind == "chat":
                msg = {"role": "assistant", "content": sched.text(i, CONTENT)}
                if sched.reasoning_tokens:
                    msg["reasoning_content"] = sched.text(i, 1 - CONTENT)
                choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": fin})
            else:
                choices.append({"index": i, "text": sched.text(i, CONTENT), "logprobs": None, "finish_reason": fin})
        obj = "chat.completion" if self.req.kind == "chat" else "text_completion"
        return dumps({"id": self.rid, "object": obj, "created": self.created, "model": self.req.model,
                      "choices": choices, "usage": self.usage(sched)})
