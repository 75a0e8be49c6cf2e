"""The official OpenAI Python SDK's stored completions, unchanged, against Parley's gateway.

Run by the end-to-end tests with PARLEY_BASE_URL, PARLEY_TOKEN, PARLEY_MODEL and PARLEY_EXPECTED (the
reply the fake model gives to "hello from the sdk"). Exits non-zero on the first broken promise.
"""

import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ["PARLEY_BASE_URL"] + "/v1", api_key=os.environ["PARLEY_TOKEN"], max_retries=0)
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


kept = client.chat.completions.create(model=model, messages=messages, store=True, metadata={"suite": "sdk"})
stream = client.chat.completions.create(model=model, messages=messages, store=True, stream=True)
streamed_id = None
for chunk in stream:
    streamed_id = chunk.id
client.chat.completions.create(model=model, messages=messages)  # not kept

found = client.chat.completions.retrieve(kept.id)
check(found.id == kept.id, f"retrieve: {found.id}")
check(found.choices[0].message.content == expected, f"content: {found.choices[0].message.content!r}")
check(found.metadata == {"suite": "sdk"}, f"metadata: {found.metadata}")
check(client.chat.completions.retrieve(streamed_id).choices[0].message.content == expected, "streamed and kept")

# The SDK's pager follows `after` and `has_more` through pages of one.
listed = [c.id for c in client.chat.completions.list(limit=1)]
check(listed == [kept.id, streamed_id], f"list: {listed}")
tagged = [c.id for c in client.chat.completions.list(metadata={"suite": "sdk"})]
check(tagged == [kept.id], f"list by metadata: {tagged}")
newest = client.chat.completions.list(order="desc", limit=1)
check([c.id for c in newest.data] == [streamed_id] and newest.has_more, f"newest first: {newest}")

updated = client.chat.completions.update(kept.id, metadata={"suite": "sdk", "round": "2"})
check(updated.metadata == {"suite": "sdk", "round": "2"}, f"update: {updated.metadata}")
check(client.chat.completions.retrieve(kept.id).metadata["round"] == "2", "updated metadata reads back")

sent = [m.content for m in client.chat.completions.messages.list(kept.id)]
check(sent == ["You are terse.", "hello from the sdk"], f"messages: {sent}")

deleted = client.chat.completions.delete(kept.id)
check(deleted.deleted and deleted.id == kept.id, f"delete: {deleted}")
try:
    client.chat.completions.retrieve(kept.id)
    check(False, "a deleted completion is gone")
except openai.NotFoundError:
    pass
print("ok")
