-- WebSocket load client for spec/ws_scale_spec.lua, run in its own lua5.4 process (so client
-- and server each have their own descriptor limit) with moonwire's own client:
--
--   lua5.4 spec/peers/ws_load.lua PORT N [CONCURRENT_HANDSHAKES]
--
-- Opens N connections to ws://127.0.0.1:PORT/load?i=<i> (at most CONCURRENT_HANDSHAKES
-- handshakes in flight at once, so the listen backlog is not flooded; every connection stays
-- open), each sends "hello <i>", expects "echo hello <i>" and the broadcast "all <N> open" (in
-- any order), then closes with 1000 "done <i>". Prints key=value lines: connected, echoed,
-- broadcast, closed (clean close handshakes), failed, first_error, seconds; exits 0 when all N
-- went through.
local mw = require "moonwire"

local port = assert(math.tointeger(tonumber(arg[1])), "usage: ws_load.lua PORT N [CONCURRENT]")
local N = assert(math.tointeger(tonumber(arg[2])), "usage: ws_load.lua PORT N [CONCURRENT]")
local CONCURRENT = math.tointeger(tonumber(arg[3] or "")) or 256
local base = ("ws://127.0.0.1:%d/load?i="):format(port)
local BROADCAST = ("all %d open"):format(N)

local stats = { connected = 0, echoed = 0, broadcast = 0, closed = 0, failed = 0 }
local first_error

local function fail(i, what, err)
  stats.failed = stats.failed + 1
  first_error = first_error or ("client %d: %s: %s"):format(i, what, tostring(err))
end

local ok, err = pcall(mw.run, function()
  local t0 = mw.now()
  local slots = mw.channel(CONCURRENT)
  for _ = 1, CONCURRENT do slots:send(true) end

  local function client(i)
    slots:recv()
    local ws, cerr = mw.websocket.connect(base .. i, { timeout = 30 })
    slots:send(true)
    if not ws then return fail(i, "connect", cerr) end
    stats.connected = stats.connected + 1
    if not ws:send("hello " .. i) then return fail(i, "send", "closed") end
    local want = "echo hello " .. i
    for _ = 1, 2 do
      local msg, kind, code = ws:receive(40)
      if msg == want then
        stats.echoed = stats.echoed + 1
      elseif msg == BROADCAST then
        stats.broadcast = stats.broadcast + 1
      else
        ws:close(1000)
        return fail(i, "receive", ("%s %s %s"):format(tostring(msg), tostring(kind), tostring(code)))
      end
    end
    ws:close(1000, "done " .. i)
    if ws.close_code == 1000 then stats.closed = stats.closed + 1 else fail(i, "close", ws.close_code) end
  end

  local tasks = {}
  for i = 1, N do tasks[i] = mw.spawn(client, i) end
  for i = 1, N do
    local tok, terr = tasks[i]:join()
    if not tok then fail(i, "task", terr) end
  end
  stats.seconds = ("%.2f"):format(mw.now() - t0)
end)
if not ok then first_error = first_error or tostring(err) end

for _, k in ipairs { "connected", "echoed", "broadcast", "closed", "failed", "seconds" } do
  print(k .. "=" .. tostring(stats[k]))
end
print("first_error=" .. (first_error or ""):gsub("\n", " | "))
os.exit(ok and stats.closed == N and stats.failed == 0 and 0 or 1)
