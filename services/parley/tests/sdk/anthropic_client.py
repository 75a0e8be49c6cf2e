"""The official Anthropic Python SDK, unchanged, against Parley's gateway (`POST /v1/messages`).

Run by the end-to-end tests with PARLEY_BASE_URL, PARLEY_TOKEN (a Parley API key), PARLEY_MODEL,
PARLEY_EXPECTED (the fake model's reply to "hello from the sdk") and PARLEY_EXPECTED_IMAGE (its reply to
"what is this" with one image). Exits non-zero on the first broken promise.
"""

import json
import os
import sys

import anthropic

base_url = os.environ["PARLEY_BASE_URL"]
client = anthropic.Anthropic(base_url=base_url, api_key=os.environ["PARLEY_TOKEN"], max_retries=0)
model = os.environ["PARLEY_MODEL"]
expected = os.environ["PARLEY_EXPECTED"]
messages = [{"role": "user", "content": "hello from the sdk"}]


def check(condition, what):
    if not condition:
        print(f"FAILED ({model}): {what}", file=sys.stderr)
        sys.exit(1)


message = client.messages.create(model=model, max_tokens=256, system="You are terse.", messages=messages)
check(message.type == "message" and message.role == "assistant", f"message: {message}")
check(message.id.startswith("msg_"), f"id: {message.id}")
check(message.model == model, f"model: {message.model}")
check([block.type for block in message.content] == ["text"], f"content: {message.content}")
check(message.content[0].text == expected, f"text: {message.content[0].text!r}")
check(message.stop_reason == "end_turn", f"stop_reason: {message.stop_reason}")
check(message.usage.input_tokens > 0 and message.usage.output_tokens > 0, f"usage: {message.usage}")

# Streamed: the SDK's helper adds the events up to the same message.
with client.messages.stream(model=model, max_tokens=256, messages=messages) as stream:
    pieces = list(stream.text_stream)
    final = stream.get_final_message()
check("".join(pieces) == expected, f"streamed text: {''.join(pieces)!r}")
check(len(pieces) > 3, f"the reply came in pieces, not one: {len(pieces)}")
check(final.content[0].text == expected, f"final message: {final.content}")
check(final.stop_reason == "end_turn", f"streamed stop_reason: {final.stop_reason}")
check(final.usage.input_tokens > 0 and final.usage.output_tokens > 0, f"streamed usage: {final.usage}")

# The raw events, in Anthropic's order.
kinds = [event.type for event in client.messages.create(model=model, max_tokens=256, messages=messages, stream=True)]
check(kinds[0] == "message_start" and kinds[-1] == "message_stop", f"event order: {kinds}")
check(kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop", f"block events: {kinds}")
check(kinds[-2] == "message_delta", f"message_delta before message_stop: {kinds}")

# Sampling parameters reach the model: a stop sequence ends the reply before it.
stopped = client.messages.create(
    model=model,
    max_tokens=100,
    messages=messages,
    stop_sequences=["fake model"],
    metadata={"user_id": "sdk-user"},
    extra_body={"temperature": 0.5, "top_p": 0.9},
)
cut = expected[: expected.index("fake model")]
check(stopped.content[0].text == cut, f"stopped text: {stopped.content[0].text!r}")

# A reply cut at max_tokens says so.
short = client.messages.create(model=model, max_tokens=2, messages=messages)
check(short.stop_reason == "max_tokens", f"short stop_reason: {short.stop_reason}")
check(short.usage.output_tokens == 2, f"short usage: {short.usage}")

# Structured output: a JSON schema for the reply, honoured where the model's providers can, refused
# naming the parameter where they cannot (Anthropic's own API takes it, Parley's Anthropic provider
# does not pass it on yet).
schema = {"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"]}
structured = {"output_config": {"format": {"type": "json_schema", "schema": schema}}}
if os.environ.get("PARLEY_JSON_MODE") == "served":
    shaped = client.messages.create(model=model, max_tokens=256, messages=messages, extra_body=structured)
    check(json.loads(shaped.content[0].text) == {"reply": expected}, f"structured reply: {shaped.content}")
else:
    try:
        client.messages.create(model=model, max_tokens=256, messages=messages, extra_body=structured)
        check(False, "structured output raised no error on a model that cannot give it")
    except anthropic.BadRequestError as error:
        check("output_config.format" in error.body["error"]["message"], f"structured refusal: {error.body}")

# Tools: the model calls one, the caller answers with its result, the model uses it.
tools = [
    {
        "name": "lookup",
        "description": "Looks a text up.",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    }
]
called = client.messages.create(
    model=model, max_tokens=256, messages=messages, tools=tools, tool_choice={"type": "any"}
)
check(called.stop_reason == "tool_use", f"tool stop_reason: {called.stop_reason}")
uses = [block for block in called.content if block.type == "tool_use"]
check(len(uses) == 1 and uses[0].name == "lookup", f"tool_use blocks: {called.content}")
check(uses[0].input == {"text": "hello from the sdk"}, f"tool input: {uses[0].input}")
answered = client.messages.create(
    model=model,
    max_tokens=256,
    tools=tools,
    messages=messages
    + [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in called.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "42"}]},
    ],
)
check(answered.content[0].text == "The tool said: 42", f"after the tool: {answered.content}")
check(answered.stop_reason == "end_turn", f"after the tool, stop_reason: {answered.stop_reason}")

# The same call, streamed: the input comes as JSON pieces the SDK puts together.
with client.messages.stream(model=model, max_tokens=256, messages=messages, tools=tools) as stream:
    final = stream.get_final_message()
uses = [block for block in final.content if block.type == "tool_use"]
check(len(uses) == 1 and uses[0].name == "lookup", f"streamed tool_use: {final.content}")
check(uses[0].input == {"text": "hello from the sdk"}, f"streamed tool input: {uses[0].input}")
check(final.stop_reason == "tool_use", f"streamed tool stop_reason: {final.stop_reason}")

# An image block reaches a model that takes images.
seen = client.messages.create(
    model=model,
    max_tokens=256,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            ],
        }
    ],
)
check(seen.content[0].text == os.environ["PARLEY_EXPECTED_IMAGE"], f"image reply: {seen.content[0].text!r}")

# Counting tokens costs no model call.
counted = client.messages.count_tokens(model=model, messages=messages)
check(counted.input_tokens > 0, f"count_tokens: {counted}")

# What the gateway cannot do is refused in Anthropic's shape, never silently dropped.
for name, extra in [
    ("thinking", {"thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ("tool_choice", {"tools": tools, "tool_choice": {"type": "tool", "name": "nope"}}),
    ("temperature", {"extra_body": {"temperature": 1.5}}),
]:
    try:
        client.messages.create(model=model, max_tokens=16, messages=messages, **extra)
        check(False, f"{name} raised no error")
    except anthropic.BadRequestError as error:
        check(error.status_code == 400, f"{name}: status {error.status_code}")
        check(error.body["error"]["type"] == "invalid_request_error", f"{name}: body {error.body}")
        check(name in error.body["error"]["message"], f"{name}: message {error.body}")

try:
    client.messages.create(model="no-such-model", max_tokens=16, messages=messages)
    check(False, "an unknown model raised no error")
except anthropic.NotFoundError as error:
    check(error.body["error"]["type"] == "not_found_error", f"unknown model: {error.body}")

try:
    anthropic.Anthropic(base_url=base_url, api_key="pk_wrong", max_retries=0).messages.create(
        model=model, max_tokens=16, messages=messages
    )
    check(False, "a bad key raised no error")
except anthropic.AuthenticationError as error:
    check(error.body["error"]["type"] == "authentication_error", f"bad key: {error.body}")

print(json.dumps({"anthropic sdk": "all checks passed", "model": model}))
