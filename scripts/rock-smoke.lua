-- Smoke test for an installed moonwire rock (scripts/check-rock runs it with only the rock's
-- tree on the paths): the module loads from that tree, an HTTP server on 127.0.0.1 port 0
-- answers a request and echoes a WebSocket message (permessage-deflate on).
--   lua5.4 rock-smoke.lua TREE
local tree = assert(arg[1], "usage: lua5.4 rock-smoke.lua TREE")

local mw = require "moonwire"
local http = require "moonwire.http"
for _, mod in ipairs { "moonwire", "moonwire.core" } do
  local where = package.searchpath(mod, mod == "moonwire.core" and package.cpath or package.path)
  assert(where and where:sub(1, #tree) == tree, mod .. " not loaded from " .. tree .. ": " .. tostring(where))
end

local ok, err = mw.run(function()
  local app = http.router()
  app:get("/hello/:name", function(req, res) res:send("hello " .. req.params.name) end)
  app:get("/ws", function(req)
    local ws = assert(req:websocket())
    for msg, kind in ws:messages() do ws:send(msg, kind) end
  end)
  local srv = assert(http.server { host = "127.0.0.1", port = 0, handler = app })
  local base = "127.0.0.1:" .. srv.port

  local res = assert(http.get("http://" .. base .. "/hello/rock"))
  assert(res.status == 200, "status " .. tostring(res.status))
  local body = assert(res:body())
  assert(body == "hello rock", "body " .. body)

  local ws = assert(mw.websocket.connect("ws://" .. base .. "/ws", { deflate = true, timeout = 5 }))
  assert(ws:send(("echo "):rep(100)))
  local msg, kind = ws:receive(5)
  assert(msg == ("echo "):rep(100) and kind == "text", "echo " .. tostring(msg))
  ws:close(1000)
  srv:close(1)
  print(("rock-smoke: moonwire %s from %s: HTTP %d %q, WebSocket echo of %d bytes")
    :format(mw.version, tree, res.status, body, #msg))
  return true
end)
assert(ok, err)
