-- A scenario: virtual users browsing the demo app (examples/app.lua on :8080).
--   moonwire bench --scenario examples/bench/users.lua -t 2 --html report.html
local bench = require "moonwire.bench"

local base = os.getenv("TARGET") or "http://127.0.0.1:8080"

return {
  stages = {
    { duration = "3s", target = 20 },    -- ramp up to 20 users
    { duration = "5s", target = 20 },    -- hold
    { duration = "2s", target = 0 },     -- ramp down
  },
  thresholds = { "http_req_duration.p99<100ms", "checks>99%" },
  user = function(vu)
    local res = bench.http.get(base .. "/hello/user" .. vu.id)
    bench.check("hello is 200", res and res.status == 200)
    res = bench.http.get(base .. "/stats")
    bench.check("stats is JSON", res and (res.headers["content-type"] or ""):find("json") ~= nil)
    bench.counter("pages"):add(2)
    bench.sleep(0.05)                    -- think time
  end,
}
