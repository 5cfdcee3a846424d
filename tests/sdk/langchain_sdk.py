"""LangChain's `ChatOpenAI` against Palaver's OpenAI-compatible API (SPEC §4),
run by tests/api/sdk.rs once per phase of the mock: `text` (the mock says
PALAVER_EXPECT_TEXT) and `tools` (it calls PALAVER_EXPECT_CALLS). Exits 1,
naming every failed check."""

import asyncio

from langchain_openai import ChatOpenAI

from sdk_checks import (
    TOOLS,
    api_key,
    base_url,
    check,
    check_eq,
    check_usage,
    expected_calls,
    expected_text,
    model,
    run,
)


def chat():
    # Chat Completions, stated: LangChain switches some models and options to
    # the Responses API on its own. Streamed usage asked for, as LangChain
    # does on its own only for api.openai.com. No retries, so a failure shows
    # at once.
    return ChatOpenAI(
        base_url=base_url(),
        api_key=api_key(),
        model=model(),
        use_responses_api=False,
        stream_usage=True,
        max_retries=0,
        timeout=30,
    )


def joined(chunks):
    """The chunks of a stream added up, as LangChain users do."""
    total = None
    for chunk in chunks:
        total = chunk if total is None else total + chunk
    check(total is not None, "the stream gave no chunk")
    return total


def usage_of(message, what):
    u = message.usage_metadata
    check(u is not None, f"{what}: no usage_metadata")
    check_usage(u["input_tokens"], u["output_tokens"], u["total_tokens"], what)


# -- text phase ---------------------------------------------------------------


def invoke_returns_the_text():
    answer = chat().invoke("hi")
    check_eq(answer.content, expected_text(), "content")
    check_eq(answer.response_metadata.get("finish_reason"), "stop", "finish_reason")
    usage_of(answer, "invoke")


def stream_joins_to_the_text():
    chunks = list(chat().stream("hi"))
    check(len(chunks) >= 2, f"only {len(chunks)} chunks")
    answer = joined(chunks)
    check_eq(answer.content, expected_text(), "joined stream")
    usage_of(answer, "stream")


def ainvoke_returns_the_text():
    answer = asyncio.run(chat().ainvoke("hi"))
    check_eq(answer.content, expected_text(), "content (ainvoke)")


# -- tools phase --------------------------------------------------------------


def calls_of(message):
    return [(c["name"], c["args"]) for c in message.tool_calls]


def bound_tools_invoke_returns_the_calls():
    answer = chat().bind_tools(TOOLS).invoke("What's the weather and the time?")
    check_eq(calls_of(answer), expected_calls(), "tool_calls (name, args)")
    check_eq(answer.invalid_tool_calls, [], "invalid_tool_calls")
    ids = [c["id"] for c in answer.tool_calls]
    check(all(ids) and len(set(ids)) == len(ids), f"tool call ids missing or repeated: {ids}")
    check_eq(answer.response_metadata.get("finish_reason"), "tool_calls", "finish_reason")


def bound_tools_stream_adds_up_to_the_calls():
    answer = joined(chat().bind_tools(TOOLS).stream("What's the weather and the time?"))
    check_eq(calls_of(answer), expected_calls(), "streamed tool_calls (name, args)")
    check_eq(answer.invalid_tool_calls, [], "streamed invalid_tool_calls")


if __name__ == "__main__":
    run(
        "langchain_sdk.py",
        {
            "text": [invoke_returns_the_text, stream_joins_to_the_text, ainvoke_returns_the_text],
            "tools": [bound_tools_invoke_returns_the_calls, bound_tools_stream_adds_up_to_the_calls],
        },
    )
