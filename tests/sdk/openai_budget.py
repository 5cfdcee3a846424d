"""The official `openai` Python package against a spent token budget (issue
#11), run by tests/api/budgets.rs with a key whose owner has a budget of 0:
the SDK raises `RateLimitError` and, although it retries 429 by default,
does not retry this one (Palaver answers `x-should-retry: false`)."""

import os
import sys

import httpx
import openai

sent = []
http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
client = openai.OpenAI(
    base_url=os.environ["PALAVER_BASE_URL"],
    api_key=os.environ["PALAVER_API_KEY"],
    max_retries=3,
    timeout=30,
    http_client=http,
)

try:
    client.chat.completions.create(model=os.environ["PALAVER_MODEL"], messages=[{"role": "user", "content": "hi"}])
except openai.RateLimitError as e:
    failures = []
    if e.status_code != 429:
        failures.append(f"status {e.status_code}")
    body = e.body if isinstance(e.body, dict) else {}
    if body.get("type") != "insufficient_quota" or body.get("code") != "budget_exceeded":
        failures.append(f"error body {e.body!r}")
    if len(sent) != 1:
        failures.append(f"the SDK sent {len(sent)} requests, expected 1 (no retry)")
    if failures:
        print("FAILED:", "; ".join(failures))
        sys.exit(1)
    print("ok: RateLimitError, not retried")
    sys.exit(0)
print("FAILED: the call succeeded past a budget of 0")
sys.exit(1)
