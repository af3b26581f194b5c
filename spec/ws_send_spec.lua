-- ws:send's fast path (one writev from C) and its fallback when the socket takes only part of
-- a frame: a large message to a peer that is not reading yet, then small ones, must arrive
-- whole and in order; after a broadcast queue was used, sends still keep their order.
-- Regression: a message sent in frames (fragment_size) whose task gave up waiting between
-- them (mw.timeout, a cancel): the queue's writer finished the frame being written, but the
-- message's later frames, its final one too, never went, so the next message began inside
-- it and the peer failed the connection (1002, "new message inside a fragmented message").

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"
local core = require "moonwire.core"

describe("WebSocket send", function()
  it("a frame the socket takes only in part is finished in order, before the next one", function()
    run(function()
      local sent = mw.channel(1)
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        local big = helper.pattern(8 * 1024 * 1024)
        assert(ws:send(big, "binary"))        -- far more than the socket buffer takes at once
        assert(ws:send("after", "text"))
        mw.websocket.broadcast({ ws }, "queued")
        assert(ws:send("last", "text"))
        sent:send(true)
        ws:receive()
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port)))
      -- 8 MiB is more than loopback socket buffers hold: the first writev is partial anyway
      local msg, kind = ws:receive(10)
      assert.equal("binary", kind)
      assert.equal(8 * 1024 * 1024, #msg)
      assert.is_true(msg == helper.pattern(8 * 1024 * 1024))
      assert.same({ "after", "text" }, { ws:receive(5) })
      assert.same({ "queued", "text" }, { ws:receive(5) })
      assert.same({ "last", "text" }, { ws:receive(5) })
      assert(sent:recv(5))
      ws:close()
      srv:close()
    end, 20)
  end)

  -- RFC 6455 §5.5.1: a close from the peer while a frame is going out: that frame is
  -- finished, then the echo goes, then the connection ends (it was cut, the echo dropped)
  it("a close from the peer while a frame goes out: the frame, then the echo, then the end", function()
    run(function()
      local ends = mw.channel(2)
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        mw.spawn(function() ends:send { "sent", ws:send(helper.pattern(8 * 1024 * 1024), "binary") } end)
        for _ in ws:messages() do end
        ends:send { "server", ws.close_code, ws.close_reason }
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port)))
      -- the server's frame has begun arriving (8 MiB: its task is still writing, as this
      -- side reads nothing yet)
      for _ = 1, 500 do
        if not ws.sock:alive() then break end
        mw.sleep(0.01)
      end
      assert.is_false(ws.sock:alive())
      assert.is_true(ws:close(1000, "bye"))
      assert.equal(1000, ws.close_code)
      local got = { ends:recv(5), ends:recv(5) }
      table.sort(got, function(a, b) return a[1] < b[1] end)
      assert.same({ { "sent", true }, { "server", 1000, "bye" } }, got)
      srv:close()
    end, 20)
  end)

  -- a send given up (mw.timeout, a cancel) leaves the connection as it was: a frame half
  -- out is finished by the queue's writer, and the messages given up count against
  -- send_queue
  it("a send given up while its frame is half out: the frame is finished, the connection goes on", function()
    run(function()
      local big = helper.pattern(8 * 1024 * 1024)
      local got = mw.channel(1)
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        got:send { mw.timeout(0.3, ws.send, ws, big, "binary") }
        got:send { ws.state, ws:send("after", "text") }
        ws:receive()
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port)))
      assert.same({ nil, "timeout", "timeout" }, got:recv(5))     -- this side read nothing yet
      local msg, kind = ws:receive(10)
      assert.equal("binary", kind)
      assert.is_true(msg == big, "the message arrived whole")
      assert.same({ "after", "text" }, { ws:receive(5) })
      assert.same({ "open", true }, got:recv(5))
      ws:close()
      srv:close()
    end, 20)
  end)

  -- the frames not yet sent follow the one being written, before what other tasks queued
  -- meanwhile, as one queue entry; with permessage-deflate (context taken over) the
  -- messages after it still inflate: the message was compressed whole before it was cut
  for _, deflate in ipairs { false, true } do
    for _, how in ipairs { "timeout", "cancelled" } do
      it(("a message in frames given up between them (%s%s): the rest follows, whole, before the next")
          :format(how, deflate and ", deflate" or ""), function()
        run(function()
          local parts = {}                    -- 8 MiB that do not compress: the writer blocks
          for i = 1, 128 do parts[i] = core.random(65536) end
          local big = table.concat(parts)
          local other, after = ("other "):rep(100), ("after "):rep(100)
          local got = mw.channel(1)
          local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
            local ws = assert(req:websocket { fragment_size = 65536, deflate = deflate and {} or false })
            local sender = mw.spawn(function()
              local r
              if how == "timeout" then r = { mw.timeout(0.3, ws.send, ws, big, "binary") }
              else r = { ws:send(big, "binary") } end
              -- (before the queue's writer starts) the message's rest is one entry, then the other
              r[4] = ws:buffered()
              return r
            end)
            -- another task's message waits for the writer meanwhile
            local queued = mw.spawn(function() return ws:send(other) end)
            repeat mw.yield() until ws:buffered() == 1
            if how == "cancelled" then sender:cancel() end
            local _, r = sender:join(10)
            got:send(r)
            assert(ws:send(after))
            assert.same({ true, true }, { queued:join(10) })
            ws:receive()
          end })
          local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port), { deflate = deflate }))
          assert.equal(deflate, ws.extensions:find("permessage-deflate", 1, true) ~= nil)
          assert.same({ nil, how, how, 2 }, got:recv(5))    -- this side read nothing yet
          local msg, kind = ws:receive(10)
          assert.equal("binary", kind)
          assert.is_true(msg == big, "the message arrived whole")
          assert.same({ other, "text" }, { ws:receive(5) })
          assert.same({ after, "text" }, { ws:receive(5) })
          ws:close()
          srv:close()
        end, 20)
      end)
    end
  end

  it("messages given up while queued count against send_queue (on_full: close, or drop)", function()
    run(function()
      local ends = mw.channel(2)
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket { send_queue = 16, on_full = req.path == "/drop" and "drop" or "close" })
        mw.spawn(function() ws:send(helper.pattern(8 * 1024 * 1024), "binary") end)  -- holds the writer
        mw.sleep(0.05)
        local msg = ("m"):rep(64 * 1024)
        local tries = 0
        for _ = 1, 200 do
          tries = tries + 1
          mw.timeout(0.001, ws.send, ws, msg, "binary")
          if ws.state ~= "open" then break end
        end
        ends:send { req.path, ws.state, tries, (ws:buffered()) }
        ws:receive(1)
      end })
      local c1 = assert(mw.websocket.connect(("ws://127.0.0.1:%d/close"):format(srv.port)))
      local r = ends:recv(5)
      assert.same({ "/close", "closed" }, { r[1], r[2] })
      assert.is_true(r[3] <= 18, "closed after " .. r[3] .. " sends")
      local c2 = assert(mw.websocket.connect(("ws://127.0.0.1:%d/drop"):format(srv.port)))
      r = ends:recv(5)
      assert.same({ "/drop", "open", 200 }, { r[1], r[2], r[3] })
      assert.is_true(r[4] <= 17, r[4] .. " frames queued")
      c1:close() c2:close()
      srv:close()
    end, 20)
  end)

  -- a text message written in pieces is held to UTF-8 as ws:send holds a whole one (the peer
  -- would fail the connection with 1007); a character may be split between two pieces
  it("ws:writer('text') raises on invalid UTF-8; a character split across pieces is fine", function()
    run(function()
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        for m, k in ws:messages() do ws:send(m, k) end
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port)))
      local w = ws:writer("text")
      assert(w:write("caf\xC3"))                           -- "é" is C3 A9: split here
      assert(w:write("\xA9 \xF0\x9F"))                    -- and a 4-byte one split too
      assert(w:write("\x8C\x99!"))
      assert(w:close())
      assert.same({ "café 🌙!", "text" }, { ws:receive(5) })
      w = ws:writer("text")
      helper.raises("text message is not valid UTF-8", w.write, w, "a\xFFb")
      assert(w:write("ok \xE2\x82"))
      helper.raises("ends inside a UTF-8 character", w.close, w)
      assert(w:write("\xAC"))                              -- (the euro sign, finished)
      assert(w:close())
      assert.same({ "ok €", "text" }, { ws:receive(5) })
      ws:close()
      srv:close()
    end, 20)
  end)

  it("a client's message the socket takes only in part (masked, through the C path) arrives whole", function()
    run(function()
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        mw.sleep(0.2)                         -- not reading yet: the client's first write is partial
        for msg, kind in ws:messages() do assert(ws:send(#msg .. " " .. kind)) end
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port)))
      local big = helper.pattern(8 * 1024 * 1024)
      assert(ws:send(big, "binary"))
      assert(ws:send("after", "text"))
      assert.same({ "8388608 binary", "text" }, { ws:receive(10) })
      assert.same({ "5 text", "text" }, { ws:receive(10) })
      ws:close()
      srv:close()
    end, 20)
  end)

  it("a handler raising after the upgrade: the peer gets 1011, the error is logged, the server goes on", function()
    run(function()
      local logged = {}
      local srv = assert(http.server{ host = "127.0.0.1", port = 0,
        error_log = function(line) logged[#logged + 1] = line end,
        handler = function(req, res)
          if req.path == "/plain" then return res:send("still serving") end
          local ws = assert(req:websocket())
          assert(ws:receive(5))
          error("boom after the upgrade")
        end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/ws"):format(srv.port)))
      assert(ws:send("go"))
      local msg, state, code = ws:receive(5)
      assert.same({ nil, "closed", 1011 }, { msg, state, code })
      assert.equal(1, #logged)
      assert.matches("handler error for GET /ws: .*boom after the upgrade", logged[1])
      local res = assert(http.get(("http://127.0.0.1:%d/plain"):format(srv.port)))
      assert.equal("still serving", res:body())
      srv:close()
    end, 20)
  end)

  -- ws:send's common case is C (core.ws_send); the Lua send takes the rest. The same cases
  -- through both must put the same frames on the wire: the Lua path forced by `_tuned` (set
  -- when fragment_size or idle_timeout is, neither of which is here, so it changes nothing
  -- else), and the same errors for the same misuse.
  local KEY = "dGhlIHNhbXBsZSBub25jZQ=="
  local CASES = { { "", "text" }, { "hello" }, { "héllo wörld", "text" }, { ("b"):rep(125), "binary" },
    { ("c"):rep(126), "binary" }, { ("d"):rep(65535), "text" }, { ("e"):rep(65536), "binary" },
    { ("compressible "):rep(50), "text" }, { ("x"):rep(127) } }

  local function read_frames(s, n)
    local frames = {}
    for i = 1, n do
      local h = assert(s:read(2, 10))
      local b0, b1 = h:byte(1, 2)
      local len = b1 & 0x7f
      if len == 126 then len = string.unpack(">I2", assert(s:read(2, 10)))
      elseif len == 127 then len = string.unpack(">I8", assert(s:read(8, 10))) end
      assert.equal(0, b1 & 0x80, "a server's frames are not masked")
      frames[i] = { b0, len > 0 and assert(s:read(len, 10)) or "" }
    end
    return frames
  end

  for _, deflate in ipairs { false, true } do
    it(("the C path and the Lua path send the same frames and raise the same errors%s"):format(
        deflate and " (permessage-deflate)" or ""), function()
      run(function()
        local errs = { {}, {} }
        local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
          local ws = assert(req:websocket { deflate = deflate and {} or false })
          for pass = 1, 2 do
            ws._tuned = pass == 2
            for _, c in ipairs(CASES) do assert(ws:send(c[1], c[2])) end
            errs[pass][1] = select(2, pcall(ws.send, ws, "\xff\xfe", "text"))
            errs[pass][2] = select(2, pcall(ws.send, ws, "x", "binery"))
            errs[pass][3] = select(2, pcall(ws.send, ws, 42))
          end
          ws._tuned = false
          ws:receive()
        end })
        local s = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
        assert(s:write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
          "Sec-WebSocket-Key: " .. KEY .. "\r\nSec-WebSocket-Version: 13\r\n" ..
          (deflate and "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; " ..
            "client_no_context_takeover\r\n" or "") .. "\r\n"))
        assert.matches("^HTTP/1%.1 101 ", assert(s:read("l", 5)))
        repeat local line = assert(s:read("l", 5)) until line == ""
        local c_path = read_frames(s, #CASES)
        local lua_path = read_frames(s, #CASES)
        assert.same(lua_path, c_path)
        assert.equal(deflate, c_path[8][1] & 0x40 ~= 0, "the compressible message was deflated")
        assert.equal(0x81, c_path[2][1])                      -- kind nil: text
        assert.same(errs[2], errs[1])
        assert.matches("bad argument #1 to 'send' %(text message is not valid UTF%-8%)", errs[1][1])
        assert.matches("bad argument #2 to 'send'", errs[1][2])
        assert.matches("bad argument #1 to 'send' %(string expected, got number%)", errs[1][3])
        s:close()
        srv:close()
      end, 20)
    end)
  end

  it("the C path on a closed WebSocket returns nil, 'closed', 'closed' as the Lua path does", function()
    run(function()
      local got = {}
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req)
        local ws = assert(req:websocket())
        ws:close()
        got[1] = { ws:send("late") }
        ws._tuned = true
        got[2] = { ws:send("late") }
      end })
      local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(srv.port)))
      ws:receive(5)
      ws:close()
      mw.sleep(0.05)
      assert.same({ nil, "closed", "closed" }, got[1])
      assert.same(got[2], got[1])
      srv:close()
    end, 20)
  end)
end)
