// The official OpenAI Node SDK, unchanged, against Parley's gateway.
//
// Run by the end-to-end tests with NODE_PATH at the SDK's node_modules and PARLEY_BASE_URL,
// PARLEY_TOKEN, PARLEY_MODEL and PARLEY_EXPECTED (the reply the fake model gives to "hello from the
// sdk"). Exits non-zero on the first broken promise.

const OpenAI = require("openai");

const client = new OpenAI({
  baseURL: `${process.env.PARLEY_BASE_URL}/v1`,
  apiKey: process.env.PARLEY_TOKEN,
  maxRetries: 0,
});
const model = process.env.PARLEY_MODEL;
const expected = process.env.PARLEY_EXPECTED;
const messages = [
  { role: "system", content: "You are terse." },
  { role: "user", content: "hello from the sdk" },
];

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
}

async function main() {
  const ids = [];
  for await (const listed of client.models.list()) ids.push(listed.id);
  check(ids.includes(model), `models.list includes ${model}: ${ids}`);

  const completion = await client.chat.completions.create({ model, messages });
  check(completion.choices[0].message.content === expected, `content: ${completion.choices[0].message.content}`);
  check(completion.choices[0].finish_reason === "stop", `finish_reason: ${completion.choices[0].finish_reason}`);
  check(completion.usage.completion_tokens > 0, `usage: ${JSON.stringify(completion.usage)}`);

  const stream = await client.chat.completions.create({
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length > 0) text += chunk.choices[0].delta.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  check(text === expected, `streamed text: ${text}`);
  check(usage !== null && usage.completion_tokens > 0, `streamed usage: ${JSON.stringify(usage)}`);

  // A tool call, and the stream's helper that assembles one from its pieces.
  const tools = [{ type: "function", function: { name: "lookup", parameters: { type: "object" } } }];
  const called = await client.chat.completions.create({ model, messages, tools, tool_choice: "required" });
  const call = called.choices[0].message.tool_calls?.[0];
  check(call?.function.name === "lookup", `tool call: ${JSON.stringify(called.choices[0].message)}`);
  check(JSON.parse(call.function.arguments).text === "hello from the sdk", `arguments: ${call.function.arguments}`);
  const runner = client.chat.completions.stream({ model, messages, tools });
  const final = await runner.finalChatCompletion();
  check(final.choices[0].message.tool_calls?.[0]?.function.name === "lookup", `streamed call: ${JSON.stringify(final)}`);

  try {
    await client.chat.completions.create({ model: "no-such-model", messages });
    check(false, "an unknown model raised no error");
  } catch (error) {
    check(error instanceof OpenAI.NotFoundError, `error type: ${error}`);
    check(error.code === "model_not_found", `code: ${error.code}`);
  }
  try {
    await client.chat.completions.create({ model, messages, top_p: 1.5 });
    check(false, "top_p 1.5 raised no error");
  } catch (error) {
    check(error instanceof OpenAI.BadRequestError, `error type: ${error}`);
    check(error.param === "top_p", `param: ${error.param}`);
  }
  console.log("openai node sdk: all checks passed");
}

main().catch((error) => {
  console.error(`FAILED: ${error.stack ?? error}`);
  process.exit(1);
});
