"""SSE parsing and stream accounting: the realities of streams on the wire."""

import json

import pytest

from opskit.core.llm_json import completion_usage
from opskit.core.sse import DONE, ONE_EVENT_MAX, SSEParser
from opskit.core.stream_meter import StreamMeter


def chunk(content=None, reasoning=None, role=None, usage=None, finish=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    obj = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}
    if usage is not None:
        obj = {"id": "x", "choices": [], "usage": usage}
    return json.dumps(obj)


STREAM = (
    f"data: {chunk(role='assistant', content='')}\n\n"
    f"data: {chunk(content='Hel')}\n\n"
    ": keep-alive\n\n"
    f"data: {chunk(content='lo')}\n\n"
    f"data: {chunk(usage={'prompt_tokens': 7, 'completion_tokens': 2, 'total_tokens': 9})}\n\n"
    "data: [DONE]\n\n"
).encode()


def parse_all(pieces):
    p = SSEParser()
    out = []
    for piece in pieces:
        out.extend(p.feed(piece))
    out.extend(p.close())
    return out


def test_whole_stream_in_one_read():
    events = parse_all([STREAM])
    assert len(events) == 5
    assert events[-1] == DONE


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_events_split_across_reads_at_every_size(size):
    pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    assert parse_all(pieces) == parse_all([STREAM])


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_other_line_endings(eol):
    data = STREAM.replace(b"\n", eol)
    pieces = [data[i:i + 5] for i in range(0, len(data), 5)]  # \r\n split across reads too
    assert parse_all(pieces) == parse_all([STREAM])


def test_multiline_data_and_other_fields():
    p = SSEParser()
    assert p.feed(b"event: x\nid: 3\nretry: 10\ndata: a\ndata:b\n\n") == ["a\nb"]


def test_unterminated_last_event_is_delivered_on_close():
    p = SSEParser()
    assert p.feed(b"data: [DONE]") == []
    assert p.close() == [DONE]


def test_meter_counts_ttft_from_first_text_not_role_chunk():
    m = StreamMeter(t0=10.0, keep_gaps=True)
    m.on_data(chunk(role="assistant", content=""), 10.1)
    m.on_data(chunk(content="Hel"), 10.25)
    m.on_data(chunk(content="lo"), 10.30)
    m.on_data(chunk(usage={"prompt_tokens": 7, "completion_tokens": 2}), 10.31)
    m.on_data(DONE, 10.32)
    assert m.ttft == pytest.approx(0.25)
    assert m.ttfot == pytest.approx(0.25)
    assert m.gaps == [pytest.approx(0.05)]
    assert m.tokens == (7, 2, True)
    assert m.done and m.malformed == 0


def test_meter_reasoning_then_content():
    m = StreamMeter(t0=0.0)
    m.on_data(chunk(reasoning="think"), 0.2)
    m.on_data(chunk(content="answer"), 0.5)
    assert m.ttft == pytest.approx(0.2)
    assert m.ttfot == pytest.approx(0.5)
    assert m.tokens == (0, 2, False)  # no usage: counted text chunks


def test_meter_counts_malformed_and_stream_errors():
    m = StreamMeter(t0=0.0)
    m.on_data("{not json", 0.1)
    m.on_data("[1, 2]", 0.1)
    m.on_data(json.dumps({"error": {"type": "server_error", "message": "boom"}}), 0.2)
    assert m.malformed == 2
    assert m.stream_error == "server_error"
    assert m.ttft is None


def test_completions_text_chunks_count():
    m = StreamMeter(t0=0.0)
    m.on_data(json.dumps({"choices": [{"index": 0, "text": "hi"}]}), 0.1)
    assert m.ttft == pytest.approx(0.1)


def test_completion_usage_from_json_body():
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
    assert completion_usage(body) == (3, 1, True, True, 0, 0)
    assert completion_usage(b"not json") == (0, 0, False, False, 0, 0)
    assert completion_usage(b'{"choices": []}') == (0, 0, False, False, 0, 0)


# Garbage a server (or anything in the path) may put in `usage`: never an exception, tokens unknown.
GARBAGE = ['"x"', "Infinity", "NaN", "[1]", "-1", "1e30", "100000000000000000000000", "true", "false", "2.5",
           '{"n": 1}']


@pytest.mark.parametrize("value", GARBAGE)
def test_garbage_usage_is_unknown_tokens_not_an_error(value):
    m = StreamMeter(t0=0.0)
    m.on_data(chunk(content="hi"), 0.1)
    m.on_data('{"choices": [], "usage": {"prompt_tokens": VALUE, "completion_tokens": 2}}'.replace("VALUE", value), 0.2)
    m.on_data(DONE, 0.3)
    assert m.tokens == (0, 1, False) and m.done and not m.malformed  # one text chunk, usage ignored
    body = ('{"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3, '
            '"completion_tokens": VALUE}}').replace("VALUE", value).encode()
    assert completion_usage(body) == (0, 0, False, True, 0, 0)


def test_odd_shapes_and_deep_nesting_never_raise():
    m = StreamMeter(t0=0.0)
    for payload in ('{"choices": 5}', '{"choices": "abc", "usage": 7}', "[" * 100_000 + "]" * 100_000,
                    '{"choices": [{"delta": {"content": {"a": 1}}}]}'):
        m.on_data(payload, 0.1)
    assert m.malformed == 1 and m.tokens == (0, 1, False)  # the nesting is malformed; the dict content is text
    assert completion_usage(b"[" * 100_000) == (0, 0, False, False, 0, 0)
    assert completion_usage(b'{"choices": 5, "usage": {"prompt_tokens": 0}}') == (0, 0, True, False, 0, 0)


def test_line_over_the_limit_ends_the_parse_in_small_pieces():
    p = SSEParser(max_line=1000)
    assert p.feed(b"data: " + b"x" * 900) == []
    for _ in range(200):  # the line grows by small writes past the limit: kept as pieces, then dropped
        assert p.feed(b"y" * 5) == []
    assert p.too_long and p._tail == []  # nothing of the line is held any more
    assert p.feed(b"\n\ndata: {}\n\n") == [] and p.close() == []  # the stream is over for the meter
    ok = SSEParser(max_line=1000)
    pieces = [b"data: " + b"a" * 400, b"b" * 400, b"c" * 100 + b"\n", b"\n"]  # 906 bytes: under the limit
    assert [e for piece in pieces for e in ok.feed(piece)] == ["a" * 400 + "b" * 400 + "c" * 100]
    assert not ok.too_long


def test_one_event_fast_path_and_what_it_leaves_to_the_line_parser():
    p = SSEParser()
    event = b"data: " + chunk(content="hi").encode() + b"\n\n"
    assert p.one_event(event) == event[6:-2]
    for read in (event + event,                      # two events in one read
                 event.replace(b": {", b": {\n", 1),  # a line break inside: two lines, not one payload
                 event.replace(b"\n\n", b"\r\n\r\n"),  # other line ends
                 b"data: " + b"x" * (ONE_EVENT_MAX + 1) + b"\n\n",  # one event, longer than the fast path takes
                 b"", b"\n\n", b"data:\n\n", b"event: x\n\n"):
        assert p.one_event(read) is None, read[:40]
        assert SSEParser().feed(read) == parse_all([read])  # (and feed() still parses it, line by line)
    assert SSEParser().feed(b"data: " + b"x" * (ONE_EVENT_MAX + 1) + b"\n\n") == ["x" * (ONE_EVENT_MAX + 1)]
    held = SSEParser()
    assert held.feed(b"data: {") == [] and held.one_event(event) is None  # an event is pending: not alone


def test_event_of_many_short_data_lines_is_bounded_too():
    p = SSEParser(max_line=1000)
    assert p.feed(b"data: " + b"z" * 90 + b"\n") == []
    for _ in range(20):
        p.feed(b"data: " + b"z" * 90 + b"\n")
    assert p.too_long and p.feed(b"\n") == []
    whole = SSEParser(max_line=1000)
    assert whole.feed(b"data: " + b"w" * 2000 + b"\n\n") == [] and whole.too_long  # one read, one long line


def test_tokens_by_type_from_deepseek_and_openai_usage():
    # DeepSeek: prompt_cache_hit_tokens; OpenAI: prompt_tokens_details.cached_tokens; both put
    # reasoning in completion_tokens_details. Cached and reasoning are parts of input and output.
    deepseek = {"prompt_tokens": 300, "completion_tokens": 40, "prompt_cache_hit_tokens": 256,
                "prompt_cache_miss_tokens": 44, "completion_tokens_details": {"reasoning_tokens": 30}}
    openai_style = {"prompt_tokens": 300, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 128},
                    "completion_tokens_details": {"reasoning_tokens": 0}}
    for usage, want in ((deepseek, (256, 30)), (openai_style, (128, 0))):
        m = StreamMeter(t0=0.0)
        m.on_data(chunk(content="hi"), 0.1)
        m.on_data(json.dumps({"choices": [], "usage": usage}), 0.2)
        assert m.tokens == (300, 40, True) and m.details == want
        body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": usage}).encode()
        assert completion_usage(body) == (300, 40, True, True, *want)


@pytest.mark.parametrize("value", [*GARBAGE, "301"])
def test_garbage_token_details_are_unknown_and_keep_the_rest(value):
    # a detail that is not a sane count, or more than the whole it is part of (301 of 300), is unknown
    usage = ('{"prompt_tokens": 300, "completion_tokens": 40, "prompt_cache_hit_tokens": VALUE, '
             '"completion_tokens_details": {"reasoning_tokens": VALUE}}').replace("VALUE", value)
    m = StreamMeter(t0=0.0)
    m.on_data('{"choices": [], "usage": ' + usage + "}", 0.2)
    assert m.tokens == (300, 40, True) and m.details == (0, 0)
    body = ('{"choices": [{"message": {"content": "hi"}}], "usage": ' + usage + "}").encode()
    assert completion_usage(body) == (300, 40, True, True, 0, 0)
    # a garbage DeepSeek field does not fall through to the OpenAI one: the first present field decides
    m = StreamMeter(t0=0.0)
    m.on_data('{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": '
              '{"cached_tokens": 2}, "prompt_cache_hit_tokens": ' + value + "}}", 0.2)
    assert m.details == (0, 0)


# Payloads of every shape: the fast decode (`_Chunk`) must leave the meter exactly as the full parse does.
SHAPES = [chunk(content="hi"), chunk(reasoning="think"), chunk(role="assistant", content=""), chunk(content=""),
          chunk(usage={"prompt_tokens": 5, "completion_tokens": 3, "prompt_cache_hit_tokens": 2,
                       "completion_tokens_details": {"reasoning_tokens": 1}}),
          '{"choices": [{"index": 0, "text": "hi"}]}', '{"choices": [{"delta": null, "text": "t"}]}',
          '{"choices": [{"delta": {"content": "a"}, "text": "b"}]}', '{"choices": [{"delta": "s"}]}',
          '{"choices": [1, {"delta": {"content": "x"}}]}', '{"choices": "abc"}', '{"choices": null, "id": 7}',
          '{"id": "first", "id": "second", "choices": []}', '{"id": "' + "i" * 300 + '"}',
          '{"error": {"code": 429}}', '{"error": "boom"}', '{"error": {}}', '{"error": null}',
          '{"usage": {"prompt_tokens": NaN, "completion_tokens": 1}}', '{"usage": {"prompt_tokens": 1e400}}',
          '{"usage": {"prompt_tokens": 100000000000000000000000, "completion_tokens": 1}}',
          '{"choices": [{"delta": {"content": ["list"]}}]}', '{"choices": [{"delta": {"content": "\\ud800"}}]}',
          ' {"choices": []} ', '{"choices": []} x', "", "null", "[1]", '"text"', "{not json", '{"a": Infinity}']


class FullParse(StreamMeter):
    """A meter that reads every payload with the full parse (what the fast decode must agree with)."""

    __slots__ = ()

    def _slow(self, payload, now):
        from unittest import mock

        import msgspec

        def refuse(_):
            raise msgspec.DecodeError("forced")
        with mock.patch("opskit.core.stream_meter.decode_chunk", refuse):
            self.on_data(payload, now)


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("payload", SHAPES + ["[DONE]", '{"choices": [{"delta": {"content": "\xe9t\xe9"}}]}'])
def test_fast_decode_accounts_as_the_full_parse(payload, as_bytes):
    fast, full = StreamMeter(t0=0.0, keep_gaps=True), FullParse(t0=0.0, keep_gaps=True)
    for now in (0.1, 0.2):
        fast.on_data(payload.encode() if as_bytes else payload, now)
        full._slow(payload, now)
    assert {k: getattr(fast, k) for k in StreamMeter.__slots__} == {k: getattr(full, k) for k in StreamMeter.__slots__}


BODIES = [b'{"id": "r1", "choices": [{"message": {"role": "assistant", "content": "hi"}}], "usage": {"prompt_tokens": 3, '
          b'"completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2}}}',
          b'{"choices": [{"message": {"content": ""}, "text": "t"}]}', b'{"choices": [{"message": {"reasoning_content": "r"}}]}',
          b'{"choices": [{"message": "s"}]}', b'{"choices": [1, {"text": "x"}]}', b'{"choices": 5, "usage": {"prompt_tokens": 0}}',
          b'{"id": 5, "choices": null}', b'{"usage": {"prompt_tokens": NaN, "completion_tokens": 1}}', b"[1]", b"null",
          b"not json", b"", b"\xef\xbb\xbf{\"id\": \"bom\"}", '{"id": "utf16"}'.encode("utf-16"), b"[" * 100_000]


@pytest.mark.parametrize("body", BODIES)
def test_fast_body_decode_reads_as_the_full_parse(body):
    from unittest import mock

    import msgspec

    from opskit.core.llm_json import completion_usage_and_id

    def refuse(_):
        raise msgspec.DecodeError("forced")
    fast = completion_usage_and_id(body)
    with mock.patch("opskit.core.llm_json._decode_body", refuse):
        assert completion_usage_and_id(body) == fast


@pytest.mark.parametrize("body, model", [(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', "m"),
                                         (b'{"model": 5}', None), (b'[{"model": "m"}]', None), (b"{bad", None),
                                         (b'{"model": "a", "model": "b"}', "b"), (b'{"model": "m", "n": NaN}', "m"),
                                         ('{"model": "u16"}'.encode("utf-16"), "u16"), (b"", None)])
def test_model_of_request_bodies(body, model):
    from opskit.sidecar.metering import model_of

    assert model_of(body) == model


def test_payload_bytes_that_are_not_utf8_read_as_their_replaced_text():
    raw = b'{"choices": [{"delta": {"content": "\xff"}}]}'
    as_bytes, as_text = StreamMeter(t0=0.0), StreamMeter(t0=0.0)
    as_bytes.on_data(raw, 0.1)
    as_text.on_data(raw.decode("utf-8", "replace"), 0.1)
    assert as_bytes.text_chunks == as_text.text_chunks == 1 and not as_bytes.malformed
    as_bytes.on_data(b'{"choices": [\xff]}', 0.2)
    assert as_bytes.malformed == 1
