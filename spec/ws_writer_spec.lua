-- A WebSocket connection has one writer (docs/websocket.md, "Sending"): whatever is sent
-- while a task is blocked writing (a large message to a peer that does not read) waits its turn.
-- Regressions:
-- * a ping while another task was blocked in ws:send: the automatic pong wrote to the socket
--   beside the blocked writer, so the reader died with "socket already has a writing task",
--   and ws:close() failed the same way;
-- * pongs bypassed the send queue's bound: a client that stopped reading while a broadcast
--   writer was blocked on it, and flooded pings, made the server queue one pong per ping
--   (2.1 million pongs, 555 MB of Lua heap in 7 s). Now control frames count against
--   send_queue and only the latest pending pong is kept (RFC 6455 5.5.3);
-- * the fast path (one writev from C, wc:try_send) and the queued path (encoded frames the
--   writer drains) drifted apart: the same messages through both must give the same bytes.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local KEY = "dGhlIHNhbXBsZSBub25jZQ=="

local function serve(handler)
  return assert(http.server{ host = "127.0.0.1", port = 0, handler = handler })
end

-- A raw client past the handshake (the 101 head read, nothing more).
local function raw_upgrade(port)
  local s = assert(mw.tcp.connect("127.0.0.1", port, { timeout = 5 }))
  assert(s:write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
    "Sec-WebSocket-Key: " .. KEY .. "\r\nSec-WebSocket-Version: 13\r\n\r\n"))
  assert.matches("^HTTP/1%.1 101 ", assert(s:read("l", 5)))
  repeat local line = assert(s:read("l", 5)) until line == ""
  return s
end

-- A masked client frame (a zero mask: the payload goes as it is).
local function frame(op, payload)
  local n = #payload
  assert(n < 126)
  return string.char(0x80 | op, 0x80 | n) .. "\0\0\0\0" .. payload
end

-- Reads one unmasked server frame: opcode, payload, fin, rsv1.
local function read_frame_full(s)
  local h = assert(s:read(2, 10))
  local b0, b1 = h:byte(1, 2)
  assert.equal(0, b1 & 0x80, "server frames are not masked")
  local n = b1 & 0x7f
  if n == 126 then n = string.unpack(">I2", assert(s:read(2, 10)))
  elseif n == 127 then n = string.unpack(">I8", assert(s:read(8, 10))) end
  local p = n > 0 and assert(s:read(n, 10)) or ""
  return b0 & 0x0f, p, b0 & 0x80 ~= 0, b0 & 0x40 ~= 0
end

-- opcode, payload of a final frame
local function read_frame(s)
  local op, p, fin = read_frame_full(s)
  assert.is_true(fin)
  return op, p
end

local BIG = 8 * 1024 * 1024   -- far more than loopback socket buffers take: the writer blocks

describe("WebSocket writer", function()
  it("a ping while another task is blocked in ws:send: the pong waits its turn; receive and close go on",
    function()
    run(function()
      local started, done = mw.channel(1), mw.channel(1)
      local srv = serve(function(req)
        local ws = assert(req:websocket { deflate = false, close_timeout = 10 })
        local sender = mw.spawn(function()
          started:send(true)
          return ws:send(("x"):rep(BIG), "binary")     -- blocks: the peer does not read yet
        end)
        local r = {}
        r.msg = { ws:receive(5) }            -- the ping is answered (queued) on the way
        r.buffered = { ws:buffered() }
        r.close = { pcall(ws.close, ws, 1000, "bye") }
        r.sender = { sender:join(5) }
        r.state, r.code = ws.state, ws.close_code
        done:send(r)
      end)
      local s = raw_upgrade(srv.port)
      assert(started:recv(5))             -- the sender is blocked in its write now
      assert(s:write(frame(9, "are you there"), frame(1, "hello")))
      -- now read: the big message, then the pong, then the close frame
      local op, p = read_frame(s)
      assert.same({ 2, BIG }, { op, #p })
      assert.same({ 10, "are you there" }, { read_frame(s) })
      assert.same({ 8, "\3\232bye" }, { read_frame(s) })
      assert(s:write(frame(8, "\3\232")))
      local r = assert(done:recv(10))
      assert.same({ "hello", "text" }, r.msg)
      assert.same({ 1, 2 + #"are you there" }, r.buffered)     -- the pong waited in the queue
      assert.same({ true, true }, r.close)
      assert.same({ true, true }, r.sender)
      assert.same({ "closed", 1000 }, { r.state, r.code })
      s:close()
      srv:close()
    end, 30)
  end)

  it("a client flooding pings without reading, its broadcast writer blocked: one pending pong, " ..
     "memory bounded", function()
    run(function()
      local PINGS = 20000
      local done = mw.channel(1)
      local srv = serve(function(req)
        local ws = assert(req:websocket { deflate = false, close_timeout = 10 })
        assert.equal(1, mw.websocket.broadcast({ ws }, ("b"):rep(BIG), "binary"))
        collectgarbage()
        collectgarbage()
        local heap0 = collectgarbage("count")
        local r = {}
        while true do
          local msg = ws:receive(10)
          if msg == "done" or msg == nil then r.last = msg break end
        end
        r.frames, r.bytes = ws:buffered()
        collectgarbage()
        collectgarbage()
        r.heap_growth = collectgarbage("count") - heap0
        done:send(r)
        ws:close(1000)
      end)
      local s = raw_upgrade(srv.port)
      local last
      for i = 1, PINGS do
        last = ("ping %d"):format(i)
        assert(s:write(frame(9, last)))
      end
      assert(s:write(frame(1, "done")))
      -- the server has read everything and the broadcast writer is still blocked
      local r = assert(done:recv(20))
      assert.equal("done", r.last)
      -- one pending pong (the latest ping's) is all that was queued behind the blocked writer
      assert.same({ 1, 2 + #last }, { r.frames, r.bytes })
      assert.is_true(r.heap_growth < 256, ("the Lua heap grew by %.0f KiB"):format(r.heap_growth))
      -- now read: the broadcast, one pong (for the latest ping), the close frame
      local op, p = read_frame(s)
      assert.same({ 2, BIG }, { op, #p })
      assert.same({ 10, last }, { read_frame(s) })
      assert.same({ 8, "\3\232" }, { read_frame(s) })
      assert(s:write(frame(8, "\3\232")))
      s:close()
      srv:close()
    end, 40)
  end)
end)
