-- POST /v1/conversations/{id}/messages, rotating over the conversations in CONVERSATIONS_FILE (one id
-- a line). Each wrk thread takes its own share of the ids (thread k: ids k+1, k+1+T, ...), so two
-- threads never send into one conversation, and with several ids per connection two requests in
-- flight almost never do either (sends into one conversation are serialised by a row lock).
-- Environment: CONVERSATIONS_FILE, WRK_THREADS, PROMPT (no quotes), SSE=1 for
-- `Accept: text/event-stream`, PARLEY_KEY, LOADTESTS_DIR.
dofile(os.getenv("LOADTESTS_DIR") .. "/wrk/report.lua")

local file = os.getenv("CONVERSATIONS_FILE")
local thread_count = tonumber(os.getenv("WRK_THREADS") or "1")
local prompt = os.getenv("PROMPT") or "Hello, Parley!"
local sse = os.getenv("SSE") == "1"
local key = os.getenv("PARLEY_KEY")

local mine = {}
local cursor = 0
local headers = {}
local body = string.format('{"content":"%s"}', prompt)

function init(args)
  local ids = {}
  for line in io.lines(file) do
    if #line > 0 then
      table.insert(ids, line)
    end
  end
  local first = (thread_index or 0) + 1
  for index = first, #ids, thread_count do
    table.insert(mine, ids[index])
  end
  if #mine == 0 then
    error("no conversation ids for thread " .. first .. " in " .. file)
  end
  headers["Content-Type"] = "application/json"
  headers["Authorization"] = "Bearer " .. key
  if sse then
    headers["Accept"] = "text/event-stream"
  end
end

function request()
  cursor = cursor % #mine + 1
  return wrk.format("POST", "/v1/conversations/" .. mine[cursor] .. "/messages", headers, body)
end
