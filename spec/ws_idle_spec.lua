-- What an idle WebSocket connection holds on the server when a task loops over ws:messages()
-- (docs/websocket.md, "What an idle connection costs"): its coroutine and what its handler
-- holds (the request, its headers, the WebSocket), not the request loop's objects: the
-- upgrade hand-off runs the handler outside the loop, and the upgraded request lets go of
-- its HTTP connection object and its response. Loopback only; raw clients in this process.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local HEAD = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

-- A raw client past the handshake.
local function open(port)
  local sock = assert(mw.tcp.connect("127.0.0.1", port, { timeout = 5 }))
  assert(sock:write(HEAD))
  assert.matches("^HTTP/1.1 101", sock:read("l", 5))
  repeat local l = assert(sock:read("l", 5)) until l == ""
  return sock
end

-- A masked text frame (key 0: the payload goes as is), and the server's unmasked echo.
local function frame(s) return string.char(0x81, 0x80 | #s, 0, 0, 0, 0) .. s end
local function echo(s) return string.char(0x81, #s) .. s end

local function guard(srv, socks)
  return setmetatable({}, { __close = function()
    for _, s in ipairs(socks) do s:close() end
    pcall(srv.close, srv, 0)
  end })
end

describe("an idle WebSocket connection served by a task", function()
  it("holds neither the HTTP connection object nor the response of the request it was upgraded from",
    function()
    run(function()
      local left = setmetatable({}, { __mode = "k" })
      local upgraded = 0
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        left[req[1]] = "the HTTP connection object"      -- (Request.slots.CONN, RES)
        left[rawget(req, 2)] = "the response"
        local ws = assert(req:websocket())
        upgraded = upgraded + 1
        for msg, kind in ws:messages() do ws:send(msg, kind) end
      end })
      local socks = {}
      local _g <close> = guard(srv, socks)
      for i = 1, 20 do socks[i] = open(srv.port) end
      assert.equal(20, upgraded)
      collectgarbage()
      collectgarbage()
      local kept = {}
      for _, what in pairs(left) do kept[#kept + 1] = what end
      assert.same({}, kept)
      -- and they all still work, the request's fields too
      assert(socks[7]:write(frame("still here")))
      assert.equal(echo("still here"), socks[7]:read(#echo("still here"), 5))
    end, 20)
  end)

  it("costs less than 4.5 KiB of Lua heap, our raw client socket included (README's style: a " ..
     "router route looping over ws:messages())", function()
    run(function()
      local _gc <close> = helper.incremental_gc()
      local app = http.router()
      app:get("/ws", function(req)
        local ws = req:websocket()
        for msg, kind in ws:messages() do ws:send(msg, kind) end
      end)
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = app })
      local socks = { open(srv.port) }     -- (the first one loads what every one uses)
      local _g <close> = guard(srv, socks)
      collectgarbage()
      collectgarbage()
      local N = 200
      local before = collectgarbage("count")
      for i = 2, N + 1 do socks[i] = open(srv.port) end
      assert.equal(N + 1, srv:connections())
      collectgarbage()
      collectgarbage()
      local per_conn = (collectgarbage("count") - before) * 1024 / N
      if os.getenv("MW_SHOW") then print(("%.0f bytes of Lua heap per idle connection"):format(per_conn)) end
      -- Measured: ~4200 (the server's side ~3850: its task's coroutine, with an 80-slot stack
      -- and five call frames, about 2.2 KiB; the request and its headers; the WebSocket),
      -- ~5500 when the request loop's frames, the HTTP connection object and the response
      -- stayed alive under the handler.
      assert.is_true(per_conn < 4.5 * 1024, ("%.0f bytes of Lua heap per idle connection"):format(per_conn))
      assert(socks[101]:write(frame("ok")))
      assert.equal(echo("ok"), socks[101]:read(4, 5))
    end, 30)
  end)
end)
