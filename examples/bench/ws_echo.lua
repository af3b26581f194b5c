-- WebSocket load: each virtual user holds a connection and measures echo round trips.
--   moonwire bench --scenario examples/bench/ws_echo.lua
-- TARGET defaults to ws://127.0.0.1:8080/ws (an echo endpoint).
local mw = require "moonwire"
local bench = require "moonwire.bench"

local target = os.getenv("TARGET") or "ws://127.0.0.1:8080/ws"
local payload = ("x"):rep(tonumber(os.getenv("SIZE") or "32"))

return {
  users = tonumber(os.getenv("USERS") or "50"), duration = os.getenv("DURATION") or "5s",
  thresholds = { "ws_rtt.p99<50ms" },
  user = function(vu)
    if not vu.ws or vu.ws.state ~= "open" then
      vu.ws = assert(mw.websocket.connect(target))
      bench.counter("ws_connects"):add(1)
    end
    for _ = 1, 100 do
      local t0 = bench.now()
      vu.ws:send(payload)
      local msg = vu.ws:receive(5)
      bench.check("echoed", msg == payload)
      bench.trend("ws_rtt"):add((bench.now() - t0) * 1000)
      bench.counter("ws_msgs"):add(1)
    end
  end,
}
