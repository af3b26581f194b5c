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

  -- The Lua heap each of N more idle connections adds, served by `handler`, our raw client
  -- socket included.
  local function heap_per_conn(handler, echo_once)
    local per_conn
    run(function()
      local _gc <close> = helper.incremental_gc()
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = handler })
      local socks = { open(srv.port) }     -- (the first one loads what every one uses)
      local _g <close> = guard(srv, socks)
      collectgarbage()
      collectgarbage()
      local N = 200
      local before = collectgarbage("count")
      for i = 2, N + 1 do
        socks[i] = open(srv.port)
        if echo_once then       -- the task has sent once (ws:send from the handler) before it idles
          assert(socks[i]:write(frame("hi")))
          assert.equal(echo("hi"), socks[i]:read(4, 5))
        end
      end
      assert.equal(N + 1, srv:connections())
      collectgarbage()
      collectgarbage()
      per_conn = (collectgarbage("count") - before) * 1024 / N
      if os.getenv("MW_SHOW") then print(("%.0f bytes of Lua heap per idle connection"):format(per_conn)) end
      assert(socks[101]:write(frame("ok")))
      assert.equal(echo("ok"), socks[101]:read(4, 5))
    end, 30)
    return per_conn
  end

  -- Measured: ~3500 (the server's side ~3150: its task's coroutine with a 40-slot stack and
  -- four call frames, about 1.5 KiB; the request and its headers; the WebSocket). ~4200 when
  -- the coroutine's stack had doubled to 80 slots (640 bytes more): it never shrinks back while
  -- the task waits (a Lua stack shrinks only to twice what is in use), and the request loop's
  -- frames or the handshake's had grown it before the handler waited. ~5500 when the request
  -- loop's frames, the HTTP connection object and the response stayed alive under the handler.
  local LIMIT = 3.75 * 1024

  -- the README's style: a router route looping over ws:messages(), echoing
  local function readme_app()
    local app = http.router()
    app:get("/ws", function(req)
      local ws = req:websocket()
      for msg, kind in ws:messages() do ws:send(msg, kind) end
    end)
    return app
  end

  it("costs less than 3.75 KiB of Lua heap, our raw client socket included (README's style: a " ..
     "router route looping over ws:messages())", function()
    local per_conn = heap_per_conn(readme_app())
    assert.is_true(per_conn < LIMIT, ("%.0f bytes of Lua heap per idle connection"):format(per_conn))
  end)

  it("costs less than 3.75 KiB of Lua heap after the task has echoed a message too (ws:send adds no " ..
     "Lua frame: its common case is in C)", function()
    local per_conn = heap_per_conn(readme_app(), true)
    assert.is_true(per_conn < LIMIT, ("%.0f bytes of Lua heap per idle connection"):format(per_conn))
  end)

  it("costs less than 3.75 KiB of Lua heap too with a handler looping over ws:receive()", function()
    local per_conn = heap_per_conn(function(req)
      local ws = assert(req:websocket())
      while true do
        local msg, kind = ws:receive()
        if not msg then break end
        ws:send(msg, kind)
      end
    end)
    assert.is_true(per_conn < LIMIT, ("%.0f bytes of Lua heap per idle connection"):format(per_conn))
  end)

  ---------------------------------------------------------------------------------------------
  -- the upgrade hand-off: a request asking to switch protocols is answered outside the loop

  -- A server whose handler is `h`, with its error log kept.
  local function serve(h)
    local errors = {}
    local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = h,
      error_log = function(line) errors[#errors + 1] = line end })
    return srv, errors
  end

  local function status_of(sock)
    local status = assert(sock:read("l", 5))
    local len
    repeat
      local l = assert(sock:read("l", 5))
      len = len or tonumber(l:lower():match("^content%-length: (%d+)"))
    until l == ""
    return status, len and sock:read(len, 5)
  end

  it("a request asking to upgrade that the handler answers as any other: answered, and the connection " ..
     "goes on", function()
    run(function()
      local srv = serve(function(req, res) res:send(req.method .. " " .. req.path) end)
      local socks = { assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 })) }
      local _g <close> = guard(srv, socks)
      local s = socks[1]
      -- (an h2c upgrade nobody takes up: the next request on the connection is parsed and answered)
      assert(s:write("GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n" ..
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "GET /a" }, { status_of(s) })
      assert(s:write("GET /a2 HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "GET /a2" }, { status_of(s) })
      -- "Connection: upgrade" without an Upgrade header: the connection goes on
      local s2 = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
      socks[2] = s2
      for _, path in ipairs { "/b", "/c" } do
        assert(s2:write("GET " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n\r\n"))
        assert.same({ "HTTP/1.1 200 OK", "GET " .. path }, { status_of(s2) })
      end
    end, 20)
  end)

  it("a handler that raises before upgrading: 500 and the connection closes; after: 1011, logged", function()
    run(function()
      local srv, errors = serve(function(req)
        if req.path == "/before" then error("boom before") end
        local ws = assert(req:websocket())
        for msg in ws:messages() do
          if msg == "raise" then error("boom after") end
        end
      end)
      local socks = {}
      local _g <close> = guard(srv, socks)
      local s = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
      socks[1] = s
      assert(s:write((HEAD:gsub("/ws", "/before"))))
      assert.same({ "HTTP/1.1 500 Internal Server Error", "Internal Server Error\n" }, { status_of(s) })
      assert.is_nil(s:read(1, 5))
      local w = open(srv.port)
      socks[2] = w
      assert(w:write(frame("raise")))
      -- a close frame: 1011
      assert.equal(string.char(0x88, 2) .. string.pack(">I2", 1011), w:read(4, 5))
      assert(w:write(string.char(0x88, 0x82, 0, 0, 0, 0) .. string.pack(">I2", 1011)))
      local deadline = mw.now() + 5
      while #errors < 2 and mw.now() < deadline do mw.sleep(0.01) end
      assert.equal(2, #errors)
      assert.matches("handler error for GET /before: .*boom before", errors[1])
      assert.matches("handler error for GET /ws: .*boom after.*traceback", errors[2])
    end, 20)
  end)

  it("the upgraded request keeps its fields, headers and socket; its body is gone", function()
    run(function()
      local got = mw.channel(1)
      local srv = serve(function(req)
        local ws = assert(req:websocket())
        local body, err = req:body()
        got:send { req.method, req.path, req.headers.upgrade, req.headers["sec-websocket-version"],
          req.remote_addr, req.socket == ws.sock, body, err }
        for _ in ws:messages() do end
      end)
      local socks = { open(srv.port) }
      local _g <close> = guard(srv, socks)
      assert.same({ "GET", "/ws", "websocket", "13", "127.0.0.1", true, nil, "the connection was upgraded" },
        got:recv(5))
    end, 20)
  end)

  it("srv:close() closes a task's WebSocket with 1001, and the task ends", function()
    run(function()
      local ended = mw.channel(1)
      local srv = serve(function(req)
        local ws = assert(req:websocket())
        for _ in ws:messages() do end
        ended:send { ws.close_code }
      end)
      local socks = { open(srv.port) }
      local _g <close> = guard(srv, socks)
      local s = socks[1]
      local closer = mw.spawn(srv.close, srv, 5)
      assert.equal(string.char(0x88, 2) .. string.pack(">I2", 1001), s:read(4, 5))
      assert(s:write(string.char(0x88, 0x82, 0, 0, 0, 0) .. string.pack(">I2", 1001)))
      assert.same({ 1001 }, ended:recv(5))
      assert.same({ true, true }, { closer:join() })
      assert.equal(0, srv:connections())
    end, 20)
  end)
end)
