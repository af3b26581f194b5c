-- wrk script: every request() returns DEPTH pipelined GET / requests in one
-- write (default 16).   wrk -s bench/http_hello.d/pipeline.lua URL -- 16
-- wrk counts each response as a request; its latency figures are per batch
-- (from the write of the batch to the last response of it).
local batch

function init(args)
  local depth = tonumber(args[1]) or 16
  local r = {}
  for i = 1, depth do r[i] = wrk.format("GET", "/") end
  batch = table.concat(r)
end

function request()
  return batch
end
