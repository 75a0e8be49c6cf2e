"""The official OpenAI Python SDK, unchanged, against Parley's gateway.

Run by the end-to-end tests with PARLEY_BASE_URL, PARLEY_TOKEN, PARLEY_MODEL, PARLEY_EXPECTED (the
reply the fake model gives to "hello from the sdk"), PARLEY_EXPECTED_IMAGE (its reply to "what is this"
with one image), PARLEY_EMBEDDINGS_MODEL and PARLEY_EXPECTED_EMBEDDING (the fake's vector for "hello
from the sdk", as JSON). Exits non-zero on the first broken promise.
"""

import json
import os
import sys

import openai

base_url = os.environ["PARLEY_BASE_URL"] + "/v1"
client = openai.OpenAI(base_url=base_url, api_key=os.environ["PARLEY_TOKEN"], max_retries=0)
model = os.environ["PARLEY_MODEL"]
expected = os.environ["PARLEY_EXPECTED"]
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello from the sdk"},
]


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


ids = [m.id for m in client.models.list().data]
check(model in ids, f"models.list includes {model}: {ids}")

completion = client.chat.completions.create(model=model, messages=messages)
check(completion.object == "chat.completion", f"object: {completion.object}")
check(completion.choices[0].message.role == "assistant", "role")
check(completion.choices[0].message.content == expected, f"content: {completion.choices[0].message.content!r}")
check(completion.choices[0].finish_reason == "stop", "finish_reason")
check(completion.usage.completion_tokens > 0, f"usage: {completion.usage}")

stream = client.chat.completions.create(
    model=model, messages=messages, stream=True, stream_options={"include_usage": True}
)
text, usage, chunks = "", None, 0
for chunk in stream:
    chunks += 1
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
check(text == expected, f"streamed text: {text!r}")
check(chunks > 3, f"the reply came in pieces, not one: {chunks} chunks")
check(usage is not None and usage.completion_tokens > 0, f"streamed usage: {usage}")

# The sampling parameters reach the model: a stop sequence ends the reply before it.
stopped = client.chat.completions.create(
    model=model,
    messages=messages,
    stop=["fake model"],
    seed=7,
    top_p=0.5,
    presence_penalty=0.1,
    frequency_penalty=0.1,
    logit_bias={"50256": -100},
    user="sdk-user",
    max_completion_tokens=100,
)
cut = expected[: expected.index("fake model")]
check(stopped.choices[0].message.content == cut, f"stopped content: {stopped.choices[0].message.content!r}")
check(stopped.choices[0].finish_reason == "stop", f"stopped finish_reason: {stopped.choices[0].finish_reason}")

# JSON mode: the reply is a JSON object.
json_reply = client.chat.completions.create(model=model, messages=messages, response_format={"type": "json_object"})
check(json.loads(json_reply.choices[0].message.content) == {"reply": expected}, "JSON mode reply")

# Tools: the model calls one, the caller answers with its result, the model uses it.
tools = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Looks a text up.",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        },
    }
]
called = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required")
check(called.choices[0].finish_reason == "tool_calls", f"tool finish_reason: {called.choices[0].finish_reason}")
calls = called.choices[0].message.tool_calls
check(calls is not None and len(calls) == 1, f"tool calls: {calls}")
check(calls[0].function.name == "lookup", f"tool name: {calls[0].function.name}")
check(json.loads(calls[0].function.arguments) == {"text": "hello from the sdk"}, f"arguments: {calls[0].function.arguments}")
answered = client.chat.completions.create(
    model=model,
    tools=tools,
    messages=messages
    + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "42"},
    ],
)
check(answered.choices[0].message.content == "The tool said: 42", f"after the tool: {answered.choices[0].message.content!r}")

# The same call, streamed: the pieces of the call add up.
stream = client.chat.completions.create(model=model, messages=messages, tools=tools, stream=True)
names, arguments, ids, finish = "", "", set(), None
for chunk in stream:
    if not chunk.choices:
        continue
    for piece in chunk.choices[0].delta.tool_calls or []:
        if piece.id:
            ids.add(piece.id)
        if piece.function and piece.function.name:
            names += piece.function.name
        if piece.function and piece.function.arguments:
            arguments += piece.function.arguments
    finish = chunk.choices[0].finish_reason or finish
check(len(ids) == 1 and names == "lookup", f"streamed call: ids {ids}, name {names!r}")
check(json.loads(arguments) == {"text": "hello from the sdk"}, f"streamed arguments: {arguments!r}")
check(finish == "tool_calls", f"streamed finish_reason: {finish}")

# Log probabilities come back with the reply.
probed = client.chat.completions.create(model=model, messages=messages, logprobs=True, top_logprobs=2)
entries = probed.choices[0].logprobs.content
check("".join(entry.token for entry in entries) == expected, f"logprobs tokens: {entries}")
check(len(entries[0].top_logprobs) == 2, f"top_logprobs: {entries[0].top_logprobs}")

# An image part reaches a model that takes images.
seen = client.chat.completions.create(
    model=model,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            ],
        }
    ],
)
expected_image = os.environ["PARLEY_EXPECTED_IMAGE"]
check(seen.choices[0].message.content == expected_image, f"image reply: {seen.choices[0].message.content!r}")

# Embeddings: a vector per input, one text always the same vector. The SDK asks for base64 and decodes it.
embeddings_model = os.environ["PARLEY_EMBEDDINGS_MODEL"]
expected_vector = json.loads(os.environ["PARLEY_EXPECTED_EMBEDDING"])
one = client.embeddings.create(model=embeddings_model, input="hello from the sdk")
check(len(one.data) == 1, f"one embedding: {one}")
vector = one.data[0].embedding
check(len(vector) == len(expected_vector), f"vector length {len(vector)}")
check(all(abs(a - b) < 1e-6 for a, b in zip(vector, expected_vector)), f"vector: {vector} vs {expected_vector}")
check(one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens, f"usage: {one.usage}")
batch = client.embeddings.create(
    model=embeddings_model, input=["first", "second", "hello from the sdk"], dimensions=4, encoding_format="float"
)
check([item.index for item in batch.data] == [0, 1, 2], f"batch order: {[item.index for item in batch.data]}")
check(all(len(item.embedding) == 4 for item in batch.data), "dimensions=4 reached the model")
check(batch.data[0].embedding != batch.data[1].embedding, "two texts, two vectors")
try:
    client.embeddings.create(model=model, input="a chat model makes no vectors")
    check(False, "embeddings from a chat model raised no error")
except openai.BadRequestError as error:
    check(error.param == "model", f"embeddings from a chat model: param {error.param!r}")

# What the gateway cannot do is refused, naming the parameter, never silently dropped.
for name, extra in [
    ("tool_choice", {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    ("top_p", {"top_p": 1.5}),
    ("n", {"n": 2}),
]:
    try:
        client.chat.completions.create(model=model, messages=messages, **extra)
        check(False, f"{name} raised no error")
    except openai.BadRequestError as error:
        check(error.status_code == 400, f"{name}: status {error.status_code}")
        check(error.param == name, f"{name}: param {error.param!r}")

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    check(False, "an unknown model raised no error")
except openai.NotFoundError as error:
    check(error.status_code == 404, f"status {error.status_code}")
    check(error.code == "model_not_found", f"code {error.code}")

try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    check(False, "a bad key raised no error")
except openai.AuthenticationError as error:
    check(error.status_code == 401, f"status {error.status_code}")

print("openai sdk: all checks passed")
