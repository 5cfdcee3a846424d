"""What the SDK scripts share: the settings and scripted answers the Rust test
(tests/api/sdk.rs) passes in the environment, the tools both SDKs offer, and
a runner that tries every check of a phase and exits 1 naming each failure."""

import json
import os
import sys
import traceback

# The tools the scripts offer the model (OpenAI's function format, which
# LangChain's bind_tools takes as it is). The mock calls whichever the Rust
# test scripts; these only have to exist in the request.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string"}},
                "required": ["timezone"],
            },
        },
    },
]


class CheckFailed(Exception):
    pass


def setting(name):
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set (tests/api/sdk.rs sets it)")
    return value


def base_url():
    return setting("PALAVER_BASE_URL")


def api_key():
    return setting("PALAVER_API_KEY")


def model():
    return setting("PALAVER_MODEL")


def expected_text():
    """What the mock was scripted to say (text phase)."""
    return setting("PALAVER_EXPECT_TEXT")


def expected_calls():
    """`[(name, arguments as a dict), ...]` the mock was scripted to call."""
    return [(name, args) for name, args in json.loads(setting("PALAVER_EXPECT_CALLS"))]


def expected_usage():
    """`(prompt_tokens, completion_tokens)` the mock reports, or None to only
    require that some usage came."""
    value = os.environ.get("PALAVER_EXPECT_USAGE")
    if not value:
        return None
    prompt, completion = (int(n) for n in value.split(","))
    return prompt, completion


def skip_responses():
    return os.environ.get("PALAVER_SDK_SKIP_RESPONSES") == "1"


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def check_eq(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")


def check_usage(prompt, completion, total, what):
    check(
        all(isinstance(n, int) for n in (prompt, completion, total)),
        f"{what}: usage counts are not integers: {prompt!r}, {completion!r}, {total!r}",
    )
    check_eq(total, prompt + completion, f"{what}: total tokens")
    usage = expected_usage()
    if usage is None:
        check(total > 0, f"{what}: no tokens counted")
    else:
        check_eq((prompt, completion), usage, f"{what}: (prompt, completion) tokens")


def run(script, phases):
    """Runs every check of the phase named in argv[1]; exits 1 if any failed."""
    if len(sys.argv) != 2 or sys.argv[1] not in phases:
        raise SystemExit(f"usage: {script} {{{','.join(phases)}}}")
    phase = sys.argv[1]
    failures = []
    for check_fn in phases[phase]:
        name = check_fn.__name__
        try:
            check_fn()
        except CheckFailed as e:
            failures.append(f"{name}: {e}")
            print(f"FAILED {name}: {e}", flush=True)
        except Exception as e:  # an SDK error is a failed check too, with its trace
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        else:
            print(f"ok {name}", flush=True)
    if failures:
        print(f"{script} {phase}: {len(failures)} of {len(phases[phase])} checks failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"{script} {phase}: all {len(phases[phase])} checks passed", flush=True)
