-- POST /v1/chat/completions (the URL given to wrk: the gateway's or the upstream's) with a short
-- prompt. Environment: MODEL, PROMPT (no quotes), STREAM=1 for `stream: true` with usage, PARLEY_KEY
-- (bearer; unset for the upstream), LOADTESTS_DIR (this directory's parent).
dofile(os.getenv("LOADTESTS_DIR") .. "/wrk/report.lua")

local model = os.getenv("MODEL") or "bench"
local prompt = os.getenv("PROMPT") or "Hello, Parley!"
local stream = os.getenv("STREAM") == "1"
local key = os.getenv("PARLEY_KEY")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
local extra = ""
if stream then
  extra = ',"stream":true,"stream_options":{"include_usage":true}'
end
wrk.body = string.format('{"model":"%s","messages":[{"role":"user","content":"%s"}]%s}', model, prompt, extra)
