-- response(status, headers, body): every response reaches the script with its status, headers
-- and body. A per-thread counter kept in the thread's state is read back in done() through
-- thread:get, and summed: the sum is the total request count.
-- luacheck: globals responses last_status last_token last_token_as_sent last_body last_type

responses = 0

function response(status, headers, body)
  responses = responses + 1
  last_status = status
  last_token = headers["x-token"] or headers["X-Token"]
  last_token_as_sent = headers["X-Token"]
  last_body = body
  last_type = type(headers)
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency)
  local sum = 0
  for i, t in ipairs(threads) do
    local n = t:get("responses")
    sum = sum + n
    print(("@%d.responses=%d"):format(i, n))
    print(("@%d.status=%s"):format(i, tostring(t:get("last_status"))))
    print(("@%d.token=%s"):format(i, tostring(t:get("last_token"))))
    print(("@%d.token_as_sent=%s"):format(i, tostring(t:get("last_token_as_sent"))))
    print(("@%d.body=%s"):format(i, tostring(t:get("last_body"))))
    print(("@%d.headers_type=%s"):format(i, tostring(t:get("last_type"))))
  end
  local samples = 0
  for i = 1, #latency do
    local _, count = latency(i)
    samples = samples + count
  end
  print("@threads=" .. #threads)
  print("@sum=" .. sum)
  print("@requests=" .. summary.requests)
  print("@latency_samples=" .. samples)
end
