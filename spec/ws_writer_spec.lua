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
--   writer drains) drifted apart: the same messages through both must give the same bytes
--   (broadcast's C loop over its members, ws_send_all, too);
-- * a broadcast skipped a member: when one member was closed during it (its send queue full
--   with on_full = "close", or a failed write), it left its topics, the last member of the
--   topic's list took its place, and the loop went on past that place.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local core = require "moonwire.core"
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

-- The same messages through both ways out, in both roles: at once (try_send: one writev
-- from C) and queued behind a blocked writer (encode, then the writer task). What the peer
-- reads (opcode, fin, rsv1, unmasked payload of every frame) must be the same.
describe("WebSocket send paths", function()
  local MARK = "--end of phase--"
  local cases = {
    { "text", "" }, { "text", "hello" }, { "binary", ("b"):rep(125) }, { "binary", ("c"):rep(126) },
    { "text", ("d"):rep(65535) }, { "binary", ("e"):rep(65536) },
    -- mw.websocket.broadcast({ ws }, ...): at once, a server's through the C loop over the
    -- members (ws_send_all: one frame for all), a client's through try_send; queued, the
    -- same frame (a client's masked for it)
    { "text", "", broadcast = true }, { "text", "hello", broadcast = true },
    { "binary", ("b"):rep(125), broadcast = true }, { "binary", ("c"):rep(126), broadcast = true },
    { "binary", ("e"):rep(65536), broadcast = true }, { "text", ("compressible "):rep(50), broadcast = true },
    { "binary", helper.pattern(150000) },          -- fragment_size = 100000: two frames
    { "binary", core.random(50000):rep(3) },       -- two frames, deflated or not
    { "text", ("compressible "):rep(50) },          -- deflated where negotiated
    { writer = { "ab", "", "cd" } },                 -- ws:writer(): a frame per write, then the end
  }

  local function send_case(ws, c)
    if c.broadcast then
      assert.equal(1, mw.websocket.broadcast({ ws }, c[2], c[1]))
      return true
    end
    if c.writer then
      local w = ws:writer("text")
      for _, chunk in ipairs(c.writer) do assert(w:write(chunk)) end
      return assert(w:close())
    end
    return assert(ws:send(c[2], c[1]))
  end

  -- The moonwire side: the cases at once, then the cases queued behind a blocked writer.
  local function exercise(ws, sync)
    for _, c in ipairs(cases) do send_case(ws, c) end
    assert(ws:send(MARK))
    assert(sync.go:recv(10))           -- the peer has read phase 1 and stops reading
    local tasks = { mw.spawn(function() return ws:send(sync.big, "binary") end) }
    for i, c in ipairs(cases) do
      tasks[#tasks + 1] = mw.spawn(function()
        send_case(ws, c)
        -- (the writer's later frames are queued after the others' messages: the mark after them)
        return i < #cases or ws:send(MARK)
      end)
    end
    mw.yield()                          -- each task has queued its (first) frame now
    local frames = ws:buffered()
    sync.queued:send(frames)
    for _, t in ipairs(tasks) do assert.same({ true, true }, { t:join(10) }) end
  end

  -- The peer's side: every frame until the mark (unmasked), as { op, fin, rsv1, payload }.
  -- (`skip`: the frames up to the first final one are the blocker's, not unmasked: that
  -- is byte by byte in Lua)
  local function read_all(s, skip)
    local frames = {}
    while true do
      local h = assert(s:read(2, 10))
      local b0, b1 = h:byte(1, 2)
      local n = b1 & 0x7f
      if n == 126 then n = string.unpack(">I2", assert(s:read(2, 10)))
      elseif n == 127 then n = string.unpack(">I8", assert(s:read(8, 10))) end
      local key = b1 & 0x80 ~= 0 and { assert(s:read(4, 10)):byte(1, 4) }
      local p = n > 0 and assert(s:read(n, 10)) or ""
      if skip then
        p = ("<%d bytes>"):format(n)
        skip = b0 & 0x80 == 0
      elseif key then
        local out = {}
        for i = 1, #p do out[i] = string.char(p:byte(i) ~ key[(i - 1) % 4 + 1]) end
        p = table.concat(out)
      end
      if p == MARK then return frames end
      frames[#frames + 1] = { b0 & 0x0f, b0 & 0x80 ~= 0, b0 & 0x40 ~= 0, p }
    end
  end

  -- Reads both phases and checks that they are the same.
  -- what blocks the writer: 8 MiB that do not compress
  local function incompressible()
    local parts = {}
    for i = 1, BIG // 65536 do parts[i] = core.random(65536) end
    return table.concat(parts)
  end

  local function peer(s, sync, deflate)
    local fast = read_all(s)
    sync.go:send(true)
    local queued = assert(sync.queued:recv(10))
    assert.equal(#cases, queued, "every case waited in the queue")
    local slow = read_all(s, true)
    -- first the blocker's message, in frames of fragment_size
    assert.equal(2, slow[1][1])
    repeat local f = table.remove(slow, 1) until f[2]
    -- (second fragments, the pattern's unless deflated below fragment_size; the writer: four frames)
    assert.equal(#cases + (deflate and 4 or 5), #fast)
    for i = 1, #fast do assert.same(fast[i], slow[i], "frame " .. i) end
    assert.equal(#fast, #slow)
    return fast
  end

  local OFFER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"

  for _, deflate in ipairs { false, true } do
   for _, uring in ipairs { true, false } do
    it(("server role%s%s: the same frames at once and queued"):format(deflate and ", deflate" or "",
        uring and "" or ", broadcast without io_uring"), function()
      local was = core.ws_uring(uring)
      finally(function() core.ws_uring(was) end)
      run(function()
        local sync = { go = mw.channel(1), queued = mw.channel(1), big = incompressible() }
        local srv = serve(function(req)
          local ws = assert(req:websocket { fragment_size = 100000, deflate = deflate and {} or false })
          exercise(ws, sync)
          ws:close()
        end)
        local s = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
        assert(s:write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
          "Sec-WebSocket-Key: " .. KEY .. "\r\nSec-WebSocket-Version: 13\r\n" ..
          (deflate and "Sec-WebSocket-Extensions: " .. OFFER .. "\r\n" or "") .. "\r\n"))
        assert.matches("^HTTP/1%.1 101 ", assert(s:read("l", 5)))
        repeat local line = assert(s:read("l", 5)) until line == ""
        local fast = peer(s, sync, deflate)
        assert.equal(deflate, fast[#fast - 4][3], "the compressible message was deflated")
        s:close()
        srv:close()
      end, 30)
    end)
   end

    it(("client role%s: the same frames at once and queued"):format(deflate and ", deflate" or ""), function()
      run(function()
        local sync = { go = mw.channel(1), queued = mw.channel(1), big = incompressible() }
        local l, port = helper.listen()
        local client = mw.spawn(function()
          local ws = assert(mw.websocket.connect(("ws://127.0.0.1:%d/"):format(port),
            { fragment_size = 100000, deflate = deflate, close_timeout = 0.1 }))
          exercise(ws, sync)
          ws:close()
          return true
        end)
        local s = assert(l:accept(5))
        local key
        repeat
          local line = assert(s:read("l", 5))
          key = key or line:match("^[Ss]ec%-[Ww]eb[Ss]ocket%-[Kk]ey: *(%S+)")
        until line == ""
        assert(s:write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
          "Sec-WebSocket-Accept: " .. core.ws_accept(key) .. "\r\n" ..
          (deflate and "Sec-WebSocket-Extensions: " .. OFFER .. "\r\n" or "") .. "\r\n"))
        local fast = peer(s, sync, deflate)
        assert.equal(deflate, fast[#fast - 4][3], "the compressible message was deflated")
        assert.same({ true, true }, { client:join(5) })
        s:close()
        l:close()
      end, 30)
    end)
  end
end)

-- Broadcast to many members, one of them slow (it stopped reading: a large message blocks its
-- writer): the others get every message at once; the slow one's queue is bounded by send_queue,
-- and on_full says what happens past it.
describe("WebSocket broadcast with a slow member", function()
  local pubsub = require "moonwire.pubsub"
  local K = 4                        -- members; the first one is slow

  -- K members with the WebSocket options `opts`, joined to topic "t" of a new local pubsub:
  -- the pubsub, the server, the raw clients and the server-side connections (in join order),
  -- and a to-be-closed value that closes them all (clients, connections, pubsub, server)
  local function join_members(opts)
    local ps = pubsub.new {}
    local joined = mw.channel(K)
    local srv = serve(function(req)
      local ws = assert(req:websocket(opts))
      assert(ws:join("t", ps))
      joined:send(ws)
      while ws.state == "open" do mw.sleep(0.05) end
    end)
    local clients, conns = {}, {}
    for i = 1, K do
      clients[i] = raw_upgrade(srv.port)
      conns[i] = assert(joined:recv(5))
    end
    local all = {}
    for i = 1, K do all[i], all[K + i] = clients[i], conns[i] end
    all[2 * K + 1], all[2 * K + 2] = ps, srv
    return ps, srv, clients, conns, helper.closer(table.unpack(all, 1, 2 * K + 2))
  end

  -- Members with send_queue = 2 and the given on_full (join_members' results); the first
  -- member's writer blocked on BIG bytes.
  local function setup_members(on_full)
    local ps, srv, clients, conns, all = join_members { deflate = false, send_queue = 2, on_full = on_full }
    assert.equal(K, ps:members("t"))
    -- the slow member: what its socket does not take of BIG is queued, its writer blocks
    assert.equal(1, mw.websocket.broadcast({ conns[1] }, ("b"):rep(BIG), "binary"))
    assert.is_truthy(conns[1]._writer)
    mw.yield()                         -- the writer task took the rest: nothing waits behind it
    assert.same({ 0, 0 }, { conns[1]:buffered() })
    return ps, srv, clients, conns, all
  end

  local function expect_messages(s, from, to)
    for i = from, to do assert.same({ 1, "m" .. i }, { read_frame(s) }) end
  end

  -- (broadcast's plain members go through io_uring where the kernel has it, else one send
  -- each: both ways)
  for _, uring in ipairs { true, false } do
    local how = uring and "" or " (without io_uring)"
    local function uring_mode()
      local was = core.ws_uring(uring)
      finally(function() core.ws_uring(was) end)
    end

    it("on_full = 'close': the slow member is closed at its third message, and leaves the topic; " ..
       "every other member (the one that took its place in the list too) gets every message" .. how, function()
      uring_mode()
      run(function()
        local ps, _, clients, conns, all = setup_members("close")
        local _ <close> = all
        assert.is_true(ps:publish("t", "m1"))
        assert.is_true(ps:publish("t", "m2"))
        assert.equal(2 * K, ps.stats.delivered)
        assert.same({ 2, 8 }, { conns[1]:buffered() })   -- two frames of 2 + 2 bytes
        assert.is_true(ps:publish("t", "m3"))            -- the slow member's queue is full
        assert.equal("closed", conns[1].state)
        assert.equal(K - 1, ps:members("t"))
        assert.equal(2 * K + K - 1, ps.stats.delivered)
        assert.is_true(ps:publish("t", "m4"))
        assert.equal(2 * K + 2 * (K - 1), ps.stats.delivered)
        for i = 2, K do expect_messages(clients[i], 1, 4) end
      end, 30)
    end)

    -- Regression (found by review): the writer task spawned for the first message had not run
    -- when the queue overflowed in the same turn: finish() dropped the queue, and the task,
    -- running then, raised "attempt to index a nil value (local 'q')" (uncaught).
    it("on_full = 'close' in the very turn the queue's writer was started: no error in its task" .. how, function()
      uring_mode()
      run(function()
        local _, _, _, conns, all = join_members { deflate = false, send_queue = 2, on_full = "close" }
        local _ <close> = all
        local counts = {}
        for i = 1, 4 do counts[i] = mw.websocket.broadcast({ conns[1] }, ("b"):rep(BIG), "binary") end
        assert.same({ 1, 1, 0, 0 }, counts)
        assert.equal("closed", conns[1].state)
        mw.sleep(0.05)                     -- (the writer task runs now)
        assert.is_false(conns[1]._writer)
      end, 30)
    end)

    it("on_full = 'drop': the slow member loses what does not fit and stays; the broadcast's count " ..
       "leaves it out" .. how, function()
      uring_mode()
      run(function()
        local _, _, clients, conns, all = setup_members("drop")
        local _ <close> = all
        local list = {}
        for i = 1, K do list[i] = conns[i] end
        for i = 1, 2 do assert.equal(K, mw.websocket.broadcast(list, "m" .. i)) end
        for i = 3, 4 do assert.equal(K - 1, mw.websocket.broadcast(list, "m" .. i)) end
        assert.equal("open", conns[1].state)
        assert.same({ 2, 8 }, { conns[1]:buffered() })   -- two frames of 2 + 2 bytes
        -- a closed member is skipped, and not counted
        conns[K]:close()
        assert.equal(K - 2, mw.websocket.broadcast(list, "m5"))
        for i = 2, K - 1 do expect_messages(clients[i], 1, 5) end
        -- the slow one reads: BIG, then the two messages that fit
        local op, p = read_frame(clients[1])
        assert.same({ 2, BIG }, { op, #p })
        expect_messages(clients[1], 1, 2)
      end, 30)
    end)

    it("a member whose write fails is closed and leaves the topic; the one that takes its place " ..
       "in the list still gets the message" .. how, function()
      uring_mode()
      run(function()
        local ps, _, clients, conns, all = join_members { deflate = false }
        local _ <close> = all
        conns[1].sock:close()                           -- its next write fails
        assert.is_true(ps:publish("t", "m1"))
        assert.equal("closed", conns[1].state)
        assert.equal(K - 1, ps:members("t"))
        assert.equal(K - 1, ps.stats.delivered)
        for i = 2, K do expect_messages(clients[i], 1, 1) end
      end, 30)
    end)
  end

  -- Regression (found by review): broadcast checked the kind but not that a text message is
  -- UTF-8, so it sent what ws:send refuses and every receiver failed its connection with
  -- 1007; a pubsub publish (kind "text") took the same path. Now broadcast raises as ws:send
  -- does, before any member gets a byte; pubsub gives such a message to no member (counted).
  it("a text broadcast that is not UTF-8 raises, naming its argument; nobody gets it", function()
    run(function()
      local ps, _, clients, conns, all = join_members { deflate = false }
      local _ <close> = all
      local list = {}
      for i = 1, K do list[i] = conns[i] end
      local ok, err = pcall(mw.websocket.broadcast, list, "ab\xff\xfe", "text")
      assert.is_false(ok)
      assert.matches("bad argument #2 to 'broadcast' (text message is not valid UTF-8)", err, 1, true)
      ok, err = pcall(mw.websocket.broadcast, list, "ab\xff\xfe")     -- (text by default)
      assert.is_false(ok)
      assert.matches("not valid UTF-8", err, 1, true)
      -- the pubsub's kind is text: its members do not get it (counted), nobody is closed
      local dropped = ps.stats.dropped
      assert.is_true(ps:publish("t", "\xc3"))
      assert.equal(dropped + 1, ps.stats.dropped)
      -- the same bytes as binary go out; the members are all open and get what follows
      assert.equal(K, mw.websocket.broadcast(list, "ab\xff\xfe", "binary"))
      assert.is_true(ps:publish("t", "m1"))
      for i = 1, K do
        assert.equal("open", conns[i].state)
        assert.same({ 2, "ab\xff\xfe" }, { read_frame(clients[i]) })
        expect_messages(clients[i], 1, 1)
      end
    end, 30)
  end)
end)
