-- WebSocket server at scale (docs/websocket.md): 10,000 concurrent connections, all open at
-- the same moment, each exchanging a message (plus one broadcast to all 10,000), from a load
-- client in a SEPARATE lua5.4 process (spec/peers/ws_load.lua, moonwire's own client: each
-- process has its own 20,000-descriptor limit); and peers that vanish mid-frame (half a frame,
-- then FIN or RST): the handler's receive says nil, "closed", 1006 and the server keeps serving.
-- Loopback only; the server listens on 127.0.0.1 port 0.

local helper = require "spec.helper"
local procs = require "spec.peers.procs"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

local errors = {}
local function serve(handler, opts)
  opts = opts or {}
  errors = {}
  opts.host, opts.port, opts.handler = "127.0.0.1", 0, handler
  opts.error_log = function(msg) errors[#errors + 1] = msg end
  return assert(http.server(opts))
end

describe("WebSocket scale", function()
  it("10,000 concurrent connections from another process, all open at once, each echoes a message " ..
     "and gets one broadcast, then closes cleanly", function()
    run(function()
      local N = 10000
      collectgarbage()
      collectgarbage()
      local fds = helper.fd_count()
      -- (broadcast's io_uring ring: one descriptor per Lua state, made on first use and kept)
      local _, ring0 = require("moonwire.core").ws_uring()
      local open, peak, upgraded, echoed, clean, odd = 0, 0, 0, 0, 0, {}
      local list = {}
      local all_open = mw.channel(0)    -- closed when the N-th connection is open
      local srv = serve(function(req)
        local i = req:query().i
        local ws = req:websocket { deflate = false }
        if not ws then
          odd[#odd + 1] = "refused " .. tostring(i)
          return
        end
        upgraded = upgraded + 1
        open = open + 1
        if open > peak then peak = open end
        list[#list + 1] = ws
        if open == N then all_open:close() end
        local msg, kind, code = ws:receive(40)
        if msg ~= "hello " .. i then
          odd[#odd + 1] = ("%s: first message %s %s %s"):format(i, tostring(msg), tostring(kind), tostring(code))
        else
          all_open:recv(40)     -- nobody answers before all N are open at the same time
          ws:send("echo " .. msg)
          echoed = echoed + 1
          local m, k, c, reason = ws:receive(40)
          if m == nil and k == "closed" and c == 1000 and reason == "done " .. i then
            clean = clean + 1
          else
            odd[#odd + 1] = ("%s: close %s %s %s %s"):format(i, tostring(m), tostring(k), tostring(c), tostring(reason))
          end
        end
        open = open - 1
      end, { backlog = 4096 })
      local _g <close> = guard(srv)

      -- the load client, in the background; the loop keeps serving while it runs
      local client_done, code, out, err = false, nil, nil, nil
      local t0 = mw.now()
      mw.spawn(function()
        code, out, err = procs.shell(("%s lua5.4 %s %d %d 256"):format(procs.lua_env(),
          procs.quote(procs.peers .. "/ws_load.lua"), srv.port, N), 55)
        client_done = true
      end)

      -- all N open at once: then one broadcast reaches every one of them
      local _, why = all_open:recv(40)
      assert.equal("closed", why, ("only %d of %d connections opened (client: %s %s %s)"):format(open, N,
        tostring(code), tostring(out), tostring(err)))
      local opened_in = mw.now() - t0
      assert.equal(N, open)
      assert.equal(N, srv:connections())
      assert.equal(N, mw.websocket.broadcast(list, ("all %d open"):format(N)))

      assert.is_true(procs.wait_for(function() return client_done end, 50), "the load client did not finish")
      local r = procs.kv(out)
      local context = ("\nload client (exit %s): %s\n%s"):format(tostring(code), out, err)
      assert.equal(0, code, context)
      assert.same({ tostring(N), tostring(N), tostring(N), tostring(N), "0" },
        { r.connected, r.echoed, r.broadcast, r.closed, r.failed }, context)
      -- the server side: every connection upgraded, was open at the peak, answered, closed cleanly
      assert.is_true(procs.wait_for(function() return srv:connections() == 0 end, 10),
        "connections left: " .. srv:connections())
      assert.same({}, odd)
      assert.same({ N, N, N, N, 0 }, { upgraded, peak, echoed, clean, open })
      assert.same({}, errors)
      srv:close()
      list = nil
      collectgarbage()
      collectgarbage()
      local _, ring1 = require("moonwire.core").ws_uring()
      assert.equal(fds + ((ring1 and not ring0) and 1 or 0), helper.fd_count())
      assert.is_true(opened_in < 30, ("opening %d connections took %.1f s"):format(N, opened_in))
    end, 58)
  end)

  ---------------------------------------------------------------------------------------------
  -- peers that vanish mid-frame

  local KEY = "dGhlIHNhbXBsZSBub25jZQ=="

  -- A raw client past the handshake (the 101 head read, nothing more).
  local function raw_upgrade(port, path)
    local s = assert(mw.tcp.connect("127.0.0.1", port, { timeout = 5 }))
    assert(s:write("GET " .. path .. " HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
      "Sec-WebSocket-Key: " .. KEY .. "\r\nSec-WebSocket-Version: 13\r\n\r\n"))
    local status = assert(s:read("l", 5))
    assert.matches("^HTTP/1%.1 101 ", status)
    repeat local line = assert(s:read("l", 5)) until line == ""
    return s
  end

  -- A masked client frame.
  local function frame(op, payload, fin)
    local b0 = (fin == false and 0 or 0x80) | op
    local n = #payload
    local head
    if n < 126 then
      head = string.char(b0, 0x80 | n)
    elseif n < 65536 then
      head = string.char(b0, 0x80 | 126) .. string.pack(">I2", n)
    else
      head = string.char(b0, 0x80 | 127) .. string.pack(">I8", n)
    end
    local key = { 0x12, 0x34, 0x56, 0x78 }
    local masked = payload:gsub("()(.)", function(i, c) return string.char(c:byte() ~ key[(i - 1) % 4 + 1]) end)
    return head .. string.char(table.unpack(key)) .. masked
  end

  -- What each kind of vanishing peer sends before it goes.
  local text300 = ("abcdefghij"):rep(30)
  local cuts = {
    ["first-byte"] = frame(1, "hello"):sub(1, 1),
    ["length"] = frame(2, ("x"):rep(70000)):sub(1, 2 + 3),            -- 3 of 8 length bytes
    ["mask"] = frame(1, "hello"):sub(1, 2 + 2),                       -- 2 of 4 mask bytes
    ["payload"] = frame(1, text300):sub(1, 4 + 4 + 150),              -- half the payload
    -- a whole first fragment, then half the continuation
    ["fragment"] = frame(1, "part one ", false) .. frame(0, text300):sub(1, 100),
    ["control"] = frame(9, "0123456789"):sub(1, 2 + 4 + 3),           -- 3 of 10 ping bytes
    -- the payload ends in the middle of a 2-byte UTF-8 character
    ["utf8-split"] = frame(1, "caf\xC3\xA9 " .. text300):sub(1, 4 + 4 + 4),
  }
  local kinds = {}
  for k in pairs(cuts) do kinds[#kinds + 1] = k end
  table.sort(kinds)

  it("peers that vanish mid-frame (FIN or RST): receive returns nil, 'closed', 1006; the server keeps serving",
    function()
    run(function()
      local ROUNDS = 20
      local results, healthy = {}, 0
      local srv = serve(function(req)
        local name = req.path:sub(2)
        local ws = assert(req:websocket {})
        if name == "echo" then
          for msg, kind in ws:messages() do
            healthy = healthy + 1
            ws:send(msg, kind)
          end
          return
        end
        if name:find("^rst") then
          -- fill the peer's receive buffer: it closes with unread data, so the kernel resets
          ws:send(("r"):rep(256 * 1024), "binary")
        end
        local n = 0
        while true do
          local msg, kind, code, reason = ws:receive(10)
          if msg == nil then
            results[#results + 1] = { name = name, got = { kind, code, reason }, state = ws.state,
              close_code = ws.close_code, messages = n }
            return
          end
          n = n + 1
        end
      end)
      local _g <close> = guard(srv)

      -- a healthy client talks to the server all along
      local stop = false
      local talker = mw.spawn(function()
        local ws <close> = assert(mw.websocket.connect(("ws://127.0.0.1:%d/echo"):format(srv.port), { timeout = 5 }))
        local i = 0
        while not stop do
          i = i + 1
          assert(ws:send("ping " .. i))
          assert.same({ "ping " .. i, "text" }, { ws:receive(5) })
        end
        return i
      end)

      local function vanish(kind, reset)
        local s = raw_upgrade(srv.port, "/" .. (reset and "rst-" or "") .. kind)
        if reset then
          -- something of the server's message has arrived (more is unread in the kernel)
          assert(s:recv(1, 5))
        end
        assert(s:write(cuts[kind]))
        s:close()
      end
      local tasks = {}
      for _ = 1, ROUNDS do
        for _, kind in ipairs(kinds) do
          tasks[#tasks + 1] = mw.spawn(vanish, kind, false)
          tasks[#tasks + 1] = mw.spawn(vanish, kind, true)
        end
      end
      for _, t in ipairs(tasks) do assert.same({ true }, { t:join() }) end
      local total = #tasks
      assert.is_true(procs.wait_for(function() return #results == total end, 15),
        ("only %d of %d handlers saw the end"):format(#results, total))
      for _, r in ipairs(results) do
        assert.same({ name = r.name, got = { "closed", 1006, "" }, state = "closed", close_code = 1006, messages = 0 },
          r)
      end

      -- still serving: the talker went on all along, and a new client is served
      stop = true
      local ok, rounds = talker:join()
      assert.is_true(ok, rounds)
      assert.is_true(rounds > 0 and healthy >= rounds)
      local ws <close> = assert(mw.websocket.connect(("ws://127.0.0.1:%d/echo"):format(srv.port), { timeout = 5 }))
      assert(ws:send("still here"))
      assert.same({ "still here", "text" }, { ws:receive(5) })
      ws:close()
      assert.is_true(procs.wait_for(function() return srv:connections() == 0 end, 10),
        "connections left: " .. srv:connections())
      assert.same({}, errors)
    end, 40)
  end)
end)
