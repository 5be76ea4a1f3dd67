"""The meter's templates (opskit.core.stream_meter): a stream's text chunks accounted without a parse
must be accounted exactly as the full parse accounts them, whatever the stream holds."""

import json
from unittest import mock

import pytest

from opskit.core import stream_meter
from opskit.core.sse import SSEParser
from opskit.core.stream_meter import StreamMeter
from opskit.sidecar.metering import MeteredCall

HEAD = '{"id":"chatcmpl-7","object":"chat.completion.chunk","created":1764612345,"model":"deepseek-chat",'
TAIL = ',"logprobs":null,"finish_reason":null}]}'
ACCOUNTING = [s for s in StreamMeter.__slots__ if s not in ("templates", "learn", "misses")]


def delta(body: str, head: str = HEAD, tail: str = TAIL) -> bytes:
    return f'data: {head}"choices":[{{"index":0,"delta":{body}{tail}\n\n'.encode()


def text(words: str, field: str = "content") -> bytes:
    return delta("{" + f'"{field}":' + json.dumps(words, ensure_ascii=False) + "}")


DONE = b"data: [DONE]\n\n"
USAGE = (f'data: {HEAD}"choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}}}\n\n'
         .encode())
ROLE = delta('{"role":"assistant","content":""}')
FINISH = delta("{}", tail=',"logprobs":null,"finish_reason":"stop"}]}')

STREAMS = {
    "chat": [ROLE] + [text(w) for w in ("Hello", ",", " wor", "ld", " \u4f60\u597d", "!")] + [FINISH, USAGE, DONE],
    "empty and escaped texts": [ROLE, text("a"), text(""), text("b"), text('say "hi"'), text("line\nbreak"),
                                text("back\\slash"), text("tab\there"), text("\u00e9"), FINISH, DONE],
    # bytes a JSON string may not hold raw: the full parse says malformed, and so must the template path
    "raw control characters and quotes": [text("a"), text("b"), delta('{"content":"x\ty"}'), delta('{"content":"x"y"}'),
                                          delta('{"content":"x\\y"}'), delta('{"content":"@@"}').replace(b"@@", b"\xff\xfe"),
                                          text("c"), DONE],
    "reasoning, then content": [ROLE] + [delta('{"content":null,"reasoning_content":' + json.dumps(w) + "}")
                                         for w in ("Let", " me", " think")]
                               + [delta('{"content":' + json.dumps(w) + ',"reasoning_content":null}')
                                  for w in ("The", " answer", "", " is")] + [FINISH, USAGE, DONE],
    "completions": [f'data: {HEAD}"choices":[{{"index":0,"text":{json.dumps(w)}{TAIL}\n\n'.encode()
                    for w in ("Once", " upon", "", " a")] + [DONE],
    "model named like the text": [text("deepseek-chat"), text("deepseek-chat"), text("x"), text(""), DONE],
    "text named like a field": [text("content"), text("reasoning_content"), text("choices"), text(""),
                                delta('{"reasoning_content":"content","content":null}'), text("y"), DONE],
    "two choices": [f'data: {HEAD}"choices":[{{"index":0,"delta":{{"content":{json.dumps(a)}}}}},'
                    f'{{"index":1,"delta":{{"content":{json.dumps(b)}}}}}]}}\n\n'.encode()
                    for a, b in (("a", "b"), ("c", "d"), ("", "e"), ("f", ""), ("", ""), ("g", "h"))] + [DONE],
    "a field that changes in every chunk": [delta('{"content":' + json.dumps(w) + "}", tail=f',"n":{i}}}]}}')
                                            for i, w in enumerate(["w"] * 40)] + [DONE],
    "an error mid-stream": [text("a"), text("b"), f'data: {HEAD}"error":{{"type":"overloaded"}}}}\n\n'.encode(),
                            text("c"), DONE],
    "usage in every chunk": [f'data: {HEAD}"choices":[{{"index":0,"delta":{{"content":"{w}"}}}}],"usage":'
                             f'{{"prompt_tokens":3,"completion_tokens":{i}}}}}\n\n'.encode()
                             for i, w in enumerate("abcde", 1)] + [DONE],
    "not JSON": [text("a"), text("b"), b'data: {"choices":[{"index":0,"delta":{"content":"c"}}]\n\n',
                 delta('{"content":"d"}')[:-3] + b"\n\n", text("e"), DONE],
}

# what the full parse says of each (text chunks, malformed events, stream error): the streams test what they mean to
FULL_PARSE = {"chat": (6, 0, None), "empty and escaped texts": (7, 0, None), "raw control characters and quotes": (4, 3, None),
              "reasoning, then content": (6, 0, None), "completions": (3, 0, None), "model named like the text": (3, 0, None),
              "text named like a field": (5, 0, None), "two choices": (5, 0, None),
              "a field that changes in every chunk": (40, 0, None), "an error mid-stream": (3, 0, "overloaded"),
              "usage in every chunk": (5, 0, None), "not JSON": (3, 2, None)}


def _reference(events: list[bytes], t0: float) -> StreamMeter:
    """The full parse: every event through SSEParser and StreamMeter.on_data, no templates."""
    meter, parser = StreamMeter(t0), SSEParser()
    for i, event in enumerate(events):
        for payload in parser.feed(event):
            meter.on_data(payload, t0 + 0.01 * (i + 1))
    for payload in parser.close():
        meter.on_data(payload, t0 + 1)
    return meter


def _metered(events: list[bytes], t0: float) -> MeteredCall:
    call = MeteredCall(t0)
    call.begin(200, {"content-type": "text/event-stream"})
    for i, event in enumerate(events):
        call.feed(event, t0 + 0.01 * (i + 1))
    return call


def _accounting(meter: StreamMeter) -> dict:
    return {k: getattr(meter, k) for k in ACCOUNTING}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_templates_account_as_the_full_parse(name):
    events, ref = STREAMS[name], _reference(STREAMS[name], 5.0)
    assert (ref.text_chunks, ref.malformed, ref.stream_error) == FULL_PARSE[name]
    call = _metered(events, 5.0)
    assert _accounting(call.meter) == _accounting(ref)
    rec = call.record("t", "m")
    assert rec.error_type == _metered_without_templates(events).record("t", "m").error_type


def _metered_without_templates(events: list[bytes]) -> MeteredCall:
    with mock.patch.object(stream_meter, "LEARN_TRIES", 0):
        return _metered(events, 5.0)


def test_a_plain_stream_is_accounted_by_its_template_after_one_parse():
    events = STREAMS["chat"]
    decode = mock.Mock(wraps=stream_meter.decode_chunk)
    with mock.patch.object(stream_meter, "decode_chunk", decode):
        call = _metered(events, 5.0)
    # ROLE, the first text (plus the two proofs of its template), FINISH and USAGE are decoded; the other
    # five texts fill the template ([DONE] is no JSON)
    assert decode.call_count == 2 + 2 + 2
    assert call.meter.text_chunks == 6 and call.meter.templates and call.meter.misses == 3


def test_reasoning_and_content_each_get_a_template_and_keep_their_timings():
    call = _metered(STREAMS["reasoning, then content"], 5.0)
    assert sorted(t[-1] for t in call.meter.templates) == [False, True]
    m = call.meter
    assert (m.ttft, m.ttfot, m.text_chunks) == (pytest.approx(0.02), pytest.approx(0.05), 6)


def test_templates_that_keep_missing_are_dropped():
    call = _metered(STREAMS["a field that changes in every chunk"], 5.0)
    assert call.meter.templates == [] and call.meter.learn == 0 and call.meter.text_chunks == 40


def test_a_slot_that_is_not_the_text_is_not_learned():
    # the text also stands as the model's value, later in the chunk than the text: the probe finds it out
    head = '{"id":"x","choices":[{"index":0,"delta":{"content":"m"}}],"model":"m"}'
    meter = StreamMeter(0.0, templates=True)
    meter.on_data(head.encode(), 0.1)
    assert meter.templates == [] and meter.learn == stream_meter.LEARN_TRIES - 1


def test_events_split_across_reads_or_glued_together_take_the_parser():
    events = STREAMS["chat"]
    wire = b"".join(events)
    for size in (1, 7, 64, len(wire)):
        call = _metered([wire[i:i + size] for i in range(0, len(wire), size)], 5.0)
        assert call.meter.text_chunks == 6 and call.meter.tokens == (9, 4, True)


def test_gaps_are_kept_on_the_template_path():
    meter, ref = StreamMeter(0.0, keep_gaps=True, templates=True), StreamMeter(0.0, keep_gaps=True)
    for i, event in enumerate(STREAMS["chat"][:7]):
        now = 0.1 * (i + 1)
        ref.on_data(event[6:-2], now)
        if not meter.on_event(event, now):
            meter.on_data(event[6:-2], now)
    assert meter.gaps == ref.gaps and len(meter.gaps) == 5


def test_reads_of_several_events_do_not_count_against_the_templates():
    events = STREAMS["chat"]
    texts = [text(w) for w in "abcdefghij" * 4]
    glued = [events[0], events[1]] + [texts[i] + texts[i + 1] for i in range(0, len(texts), 2)] + events[-3:]
    call = _metered(glued, 5.0)
    assert call.meter.templates and call.meter.misses == 3  # FINISH, USAGE, [DONE]: one event each
    assert _accounting(call.meter) == _accounting(_reference(glued, 5.0))
