"""The official `openai` Python package against Palaver's OpenAI-compatible
API (SPEC §4), run by tests/api/sdk.rs once per phase of the mock:
`text` (the mock says PALAVER_EXPECT_TEXT) and `tools` (it calls
PALAVER_EXPECT_CALLS). Exits 1, naming every failed check, when the SDK sees
anything a real OpenAI server would not send."""

import asyncio
import json
import sys

import openai

from sdk_checks import (
    TOOLS,
    CheckFailed,
    api_key,
    base_url,
    check,
    check_eq,
    check_usage,
    expected_calls,
    expected_text,
    model,
    run,
    skip_responses,
)

QUESTION = [{"role": "user", "content": "Say hello"}]
TIMEOUT = 30


def client(key=None):
    # No retries: a failure shows at once instead of after backoff.
    return openai.OpenAI(base_url=base_url(), api_key=key or api_key(), max_retries=0, timeout=TIMEOUT)


# -- text phase ---------------------------------------------------------------


def models_list_has_the_model():
    models = list(client().models.list())
    ids = [m.id for m in models]
    check(model() in ids, f"{model()!r} is not among the listed models {ids}")
    for m in models:
        check_eq(m.object, "model", f"object of model {m.id!r}")


def chat_completion_returns_the_text():
    answer = client().chat.completions.create(model=model(), messages=QUESTION)
    check_eq(answer.object, "chat.completion", "object")
    check_eq(len(answer.choices), 1, "number of choices")
    choice = answer.choices[0]
    check_eq(choice.message.role, "assistant", "message role")
    check_eq(choice.message.content, expected_text(), "message content")
    check_eq(choice.finish_reason, "stop", "finish_reason")
    check(answer.usage is not None, "no usage in a non-streamed completion")
    u = answer.usage
    check_usage(u.prompt_tokens, u.completion_tokens, u.total_tokens, "completion usage")


def streamed_chat_joins_to_the_text_and_ends_with_usage():
    stream = client().chat.completions.create(
        model=model(), messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    check(len(chunks) >= 2, f"only {len(chunks)} chunks")
    for c in chunks:
        check_eq(c.object, "chat.completion.chunk", "chunk object")
    check_eq(len({c.id for c in chunks}), 1, "distinct chunk ids in one stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_eq(text, expected_text(), "joined deltas")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check_eq(finishes, ["stop"], "finish reasons in the stream")
    last = chunks[-1]
    check_eq(last.choices, [], "choices of the last chunk (the usage chunk)")
    check(last.usage is not None, "the last chunk carries no usage")
    check_usage(last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens, "stream usage")
    early = [c for c in chunks[:-1] if c.usage is not None]
    check_eq(early, [], "chunks before the last with usage")


def async_client_streams_the_text():
    async def main():
        async with openai.AsyncOpenAI(
            base_url=base_url(), api_key=api_key(), max_retries=0, timeout=TIMEOUT
        ) as aclient:
            stream = await aclient.chat.completions.create(model=model(), messages=QUESTION, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    check_eq(asyncio.run(main()), expected_text(), "joined deltas (AsyncOpenAI)")


def stream_helper_gives_the_final_completion():
    with client().chat.completions.stream(model=model(), messages=QUESTION) as stream:
        final = stream.get_final_completion()
    check_eq(final.choices[0].message.content, expected_text(), "final completion content")


def responses_create_returns_the_text():
    answer = client().responses.create(model=model(), input="Say hello")
    check_eq(answer.object, "response", "object")
    check_eq(answer.status, "completed", "status")
    check_eq(answer.output_text, expected_text(), "output_text")
    check(answer.usage is not None, "no usage in the response")
    u = answer.usage
    check_usage(u.input_tokens, u.output_tokens, u.total_tokens, "response usage")


def streamed_responses_deltas_then_completed():
    events = list(client().responses.create(model=model(), input="Say hello", stream=True))
    types = [e.type for e in events]
    check(len(events) >= 2, f"only events {types}")
    check_eq(types[0], "response.created", "first event")
    check_eq(types[-1], "response.completed", "last event")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    check(deltas, f"no response.output_text.delta among {types}")
    check_eq("".join(deltas), expected_text(), "joined output_text deltas")
    first_delta = types.index("response.output_text.delta")
    check(first_delta < len(types) - 1, "response.completed before the deltas")
    check_eq(events[-1].response.output_text, expected_text(), "output_text of response.completed")
    numbers = [getattr(e, "sequence_number", None) for e in events]
    check(all(isinstance(n, int) for n in numbers), f"events without a sequence_number: {numbers}")
    check_eq(numbers, sorted(set(numbers)), "sequence numbers (rising, no repeats)")


def a_bad_key_raises_authentication_error():
    bad = client("pk_" + "0" * 40)
    for what, call in [
        ("models.list", lambda: bad.models.list()),
        ("chat.completions.create", lambda: bad.chat.completions.create(model=model(), messages=QUESTION)),
    ]:
        try:
            call()
        except openai.AuthenticationError:
            continue
        except openai.APIStatusError as e:
            raise CheckFailed(f"{what} with a bad key: {type(e).__name__} {e.status_code}, not 401") from e
        raise CheckFailed(f"{what} with a bad key succeeded")


# -- tools phase --------------------------------------------------------------


def calls_of(tool_calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls]


def tool_calls_non_streamed():
    answer = client().chat.completions.create(model=model(), messages=QUESTION, tools=TOOLS)
    choice = answer.choices[0]
    check_eq(choice.finish_reason, "tool_calls", "finish_reason")
    calls = choice.message.tool_calls or []
    check_eq(calls_of(calls), expected_calls(), "tool calls (name, parsed arguments)")
    ids = [c.id for c in calls]
    check(all(ids) and len(set(ids)) == len(ids), f"tool call ids missing or repeated: {ids}")
    check(all(c.type == "function" for c in calls), f"tool call types: {[c.type for c in calls]}")


def tool_calls_streamed_reassemble_by_index():
    stream = client().chat.completions.create(
        model=model(), messages=QUESTION, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    calls = {}  # index -> {"id", "name", "arguments"}
    finishes = []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                check(call["id"] in (None, delta.id), f"call {delta.index} changed id {call['id']} -> {delta.id}")
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
    check_eq(finishes, ["tool_calls"], "finish reasons in the stream")
    check_eq(sorted(calls), list(range(len(calls))), "tool call indexes")
    ordered = [calls[i] for i in sorted(calls)]
    check(all(c["id"] for c in ordered), f"a streamed call has no id: {ordered}")
    check_eq(len({c["id"] for c in ordered}), len(ordered), "distinct ids of the streamed calls")
    got = [(c["name"], json.loads(c["arguments"])) for c in ordered]
    check_eq(got, expected_calls(), "streamed tool calls (name, parsed arguments)")


def stream_helper_parses_the_tool_calls():
    with client().chat.completions.stream(model=model(), messages=QUESTION, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    check_eq(calls_of(final.choices[0].message.tool_calls or []), expected_calls(), "final completion's calls")


def tool_results_are_accepted_back():
    # The agent loop: the calls go back with their results (tests/api/sdk.rs
    # then looks for them in what the provider got). The mock, still
    # scripted to call tools, just calls them again.
    first = client().chat.completions.create(model=model(), messages=QUESTION, tools=TOOLS)
    message = first.choices[0].message
    results = [
        {"role": "tool", "tool_call_id": c.id, "content": f"result of {c.function.name}"}
        for c in message.tool_calls or []
    ]
    check(results, "the first answer called no tool")
    called = [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in message.tool_calls
    ]
    history = QUESTION + [{"role": "assistant", "content": message.content, "tool_calls": called}] + results
    again = client().chat.completions.create(model=model(), messages=history, tools=TOOLS)
    check_eq(again.choices[0].finish_reason, "tool_calls", "finish_reason after the tool results")


TEXT = [
    models_list_has_the_model,
    chat_completion_returns_the_text,
    streamed_chat_joins_to_the_text_and_ends_with_usage,
    async_client_streams_the_text,
    stream_helper_gives_the_final_completion,
    a_bad_key_raises_authentication_error,
]
RESPONSES = [responses_create_returns_the_text, streamed_responses_deltas_then_completed]
TOOLS_PHASE = [
    tool_calls_non_streamed,
    tool_calls_streamed_reassemble_by_index,
    stream_helper_parses_the_tool_calls,
    tool_results_are_accepted_back,
]

if __name__ == "__main__":
    if not skip_responses():
        TEXT += RESPONSES
    elif sys.argv[1:] == ["text"]:
        print("leaving out the responses checks (PALAVER_SDK_SKIP_RESPONSES=1)", flush=True)
    run("openai_sdk.py", {"text": TEXT, "tools": TOOLS_PHASE})
