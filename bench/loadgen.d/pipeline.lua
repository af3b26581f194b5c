-- luacheck: globals wrk init request
-- wrk script for bench/loadgen's "pipelined" mode: wrk pipelines when request()
-- returns several requests in one string; every call returns DEPTH GET /
-- requests (default 16), written at once.
--   wrk -s bench/loadgen.d/pipeline.lua http://127.0.0.1:8080/ -- 16
-- (`moonwire bench --pipeline 16` does the same without a script; bench/loadgen
-- also runs moonwire with this script in its "pipelined-script" mode.)
-- wrk records one latency sample per batch; moonwire one per response.
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
