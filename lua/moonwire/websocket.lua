--- WebSocket (RFC 6455) with permessage-deflate (RFC 7692), both roles, one API.
-- Frames are parsed and built in C (src/ws.c); the handshakes, control frames, the close
-- handshake, keepalive and broadcast queues are here.
local mw = require "moonwire"
local core = require "moonwire.core"
local url = require "moonwire.url"
local seconds = require("moonwire.opts").seconds

local ws_conn, ws_accept, random, utf8_valid = core.ws_conn, core.ws_accept, core.random, core.utf8_valid
local park, unpark, current, dispatch = core.park, core.unpark, core.current, core.dispatch
local watch, rewatch, unwatch = core.watch, core.rewatch, core.unwatch
-- the per-frame methods of the C connection object, called as plain functions
local receive_frame, try_send = core.ws_methods.receive_frame, core.ws_methods.try_send
local ws_frame, ws_send_all = core.ws_frame, core.ws_send_all
local http_head = core.http_head
local traceback = debug.traceback

local M = {}

local WebSocket = {}
WebSocket.__index = WebSocket
WebSocket.__name = "moonwire.WebSocket"

local OP = { continuation = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 }

-- A handled connection's _pump: its socket is watched, a worker is handing it messages, or
-- its close handler ran. (Integers: Lua compares with an integer constant inline, with a
-- string or boolean constant through a function call.)
local PUMP_WATCHED <const> = 0
local PUMP_BUSY <const> = 1
local PUMP_ENDED <const> = 2

-- every connection option (nil defaults included: pairs() would skip those)
local option_names = { "max_message", "max_frame", "fragment_size", "close_timeout", "ping_interval",
  "idle_timeout", "send_queue", "on_full", "deflate_threshold" }

local defaults = {
  max_message = 16 * 1024 * 1024,
  max_frame = nil,              -- default: max_message
  fragment_size = nil,          -- split outgoing messages into frames of this size
  close_timeout = 5,            -- the close handshake must complete within this
  ping_interval = nil,          -- send a ping every N seconds
  idle_timeout = nil,           -- close (1001) when nothing arrived for N seconds
  send_queue = 1024,            -- broadcast: messages queued per connection
  on_full = "close",            -- broadcast: "close" the slow connection or "drop" the message
  deflate_threshold = 128,      -- messages shorter than this are sent uncompressed
}

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

local base64 = require("moonwire.http.client").base64

-- The connection options, checked before the handshake (a server would otherwise have
-- answered 101 already, and a bad value would surface later: in a send, in the keepalive
-- task). Raises "bad option 'name' (...)" at the caller of connect / req:websocket.
local function positive_int(v)
  return math.type(v) == "integer" and v > 0 or (math.type(v) == "float" and v > 0 and v % 1 == 0)
end
local function positive(v) return type(v) == "number" and v > 0 end
local function non_negative(v) return type(v) == "number" and v >= 0 end
local option_checks = {
  max_message = { positive_int, "positive integer" },
  max_frame = { positive_int, "positive integer" },
  fragment_size = { positive_int, "positive integer" },
  send_queue = { positive_int, "positive integer" },
  deflate_threshold = { non_negative, "non-negative number" },
  close_timeout = { non_negative, "non-negative number" },
  ping_interval = { positive, "positive number" },
  idle_timeout = { positive, "positive number" },
  -- (as every timeout: a number or a numeric string, negative for none; docs/api.md)
  timeout = { function(v) return seconds(v) ~= nil end, "number" },
  on_full = { function(v) return v == "close" or v == "drop" end, "'close' or 'drop'" },
  deflate = { function(v) return type(v) == "boolean" or type(v) == "table" end, "boolean or table" },
  protocols = { function(v) return type(v) == "table" end, "table" },
  origins = { function(v) return type(v) == "table" or type(v) == "function" end, "table or function" },
  headers = { function(v) return type(v) == "table" end, "table" },
  origin = { function(v) return type(v) == "string" end, "string" },
}
local function check_options(opts)
  for k, c in pairs(option_checks) do
    local v = opts[k]
    if v ~= nil and not c[1](v) then
      error(("bad option '%s' (%s expected, got %s)"):format(k, c[2],
        type(v) == "number" and tostring(v) or type(v)), 3)
    end
  end
end

local function valid_send_code(code)
  return (code >= 1000 and code <= 1003) or (code >= 1007 and code <= 1014) or (code >= 3000 and code <= 4999)
end

-- ---------------------------------------------------------------------------------------
-- the connection object

-- Defaults live in the class table (no option shares a method's name): a connection holds
-- only what differs, which matters with 10,000s of idle connections.
for k, v in pairs(defaults) do WebSocket[k] = v end
WebSocket.extensions = ""

local function new(sock, wc, opts, protocol, extensions, deflate)
  -- (what every message reads is in the table itself, false when unset: a field missing
  -- here is looked up in the class on each read. _tuned: idle_timeout or fragment_size,
  -- which each message would read, is set)
  local self = setmetatable({
    sock = sock, wc = wc, state = "open", protocol = protocol, extensions = extensions,
    _deflate = deflate, _writer = false, _tuned = false,
  }, WebSocket)
  if opts then
    for _, k in ipairs(option_names) do
      local o = opts[k]
      if o ~= nil then self[k] = o end
    end
    self._tuned = (self.idle_timeout or self.fragment_size) and true or false
  end
  if self.idle_timeout then self._last_rx = mw.now() end
  if self.ping_interval or self.idle_timeout then self._keepalive_task = mw.spawn(M._keepalive, self) end
  return self
end

-- The C connection object. (ws_conn only reads its options: one table serves every
-- connection, refilled each time, rather than one more table per handshake.)
local conn_opts = {}
local function open_conn(sock, client, opts, dparams)
  local o = conn_opts
  o.client, o.max_message, o.max_frame, o.deflate = client, opts.max_message or defaults.max_message,
    opts.max_frame, dparams
  local wc = ws_conn(sock, o)
  o.deflate = nil
  return wc
end

local function wake_closers(self)
  local closers = self._closers
  if not closers then return end
  self._closers = nil
  for _, t in ipairs(closers) do unpark(t, true) end
end

-- The task that was receiving leaves (a message, a timeout, a cancel) without the peer's
-- close frame while close() waits for it to read that: close() is woken to read it itself.
local function reader_left(self)
  if self.state == "closing" and not self._close_reader then wake_closers(self) end
end

local function add_closer(self)
  local closers = self._closers
  if not closers then closers = {} self._closers = closers end
  closers[#closers + 1] = current()
end

-- Drops what waits in the send queue (the connection is done): the tasks parked on their
-- messages get nil, "closed".
local function drop_queue(self)
  local q = self._outq
  if not q then return end
  self._outq, self._pong = nil, nil
  for i = q.first, q.last do
    local waiter = q[i][3]
    if waiter then unpark(waiter, nil, "closed", "closed") end
  end
end

-- The tasks waiting in ws:ping() for a pong that will not come now: nil, "closed".
local function wake_pings(self)
  local pings = self._pings
  if not pings then return end
  self._pings = nil
  for _, waiters in pairs(pings) do
    for _, w in ipairs(waiters) do
      w.closed = true
      unpark(w.task, nil, "closed", "closed")
    end
  end
end

local close_handler_task   -- (below: a close handler of a connection read by a task)

-- Ends the connection now (no more frames either way).
local function finish(self, code, reason)
  if self.state ~= "closed" then
    self.state = "closed"
    self.close_code, self.close_reason = code, reason or ""
    -- a close handler without a message handler: no pump will call it, a task does
    if self._on_close and not self._on_message then mw.spawn(close_handler_task, self) end
  end
  self.sock:close()
  drop_queue(self)
  wake_closers(self)
  wake_pings(self)
  if self._topics then
    for topic, ps in pairs(self._topics) do ps:leave(self, topic) end
  end
  -- the keepalive task ends now rather than after its next interval
  local ka = self._keepalive_task
  if ka and ka ~= current() then ka:cancel() end
end

-- ---------------------------------------------------------------------------------------
-- sending: one writer
--
-- A socket allows one writing task, so a connection has one writer at a time
-- (self._writer): the task whose frame is going out, or the queue's writer task. A frame is
-- sent at once, in one write from C (try_send), when nobody writes; what the socket does
-- not take the sender writes, waiting, before it lets the slot go. While somebody writes,
-- frames wait in the send queue (self._outq), in order, and the writer task sends them
-- after: a sending task's message parks it until it is written (backpressure), a
-- broadcast, ping, pong or close frame does not wait and counts against send_queue
-- (on_full). Of the pongs waiting there only the latest is kept (RFC 6455 5.5.3).

-- The slot goes free: the tasks waiting for that (wait_writer) go on.
local function free_writer(self)
  self._writer = false
  local ch = self._writer_free
  if ch then
    self._writer_free = nil
    ch:close()
  end
end

-- Waits, at most `limit` seconds, until nobody writes (the frame going out and the queue
-- behind it are written); true when so. (A channel the freeing closes: a wait that times
-- out leaves nothing behind.)
local function wait_writer(self, limit)
  local deadline = mw.now() + limit
  while self._writer do
    local left = deadline - mw.now()
    if left <= 0 then return false end
    local ch = self._writer_free
    if not ch then
      ch = mw.channel(0)
      self._writer_free = ch
    end
    ch:recv(left)
  end
  return true
end

-- Sends the queue: runs in the writer task, which holds the slot until the queue is empty.
local function writer_task(self)
  local q = self._outq
  -- (the connection ended before this task first ran, e.g. the queue it was spawned for
  -- overflowed with on_full = "close" in the same turn: finish() dropped the queue)
  if not q then free_writer(self) return end
  while q.first <= q.last do
    local e = q[q.first]
    q[q.first] = nil
    q.first = q.first + 1
    if e == self._pong then self._pong = nil end
    local ok, err, code = self.sock:write(e[1], e[2])
    if e[3] then unpark(e[3], ok and true, err, code) end
    if not ok then
      free_writer(self)
      finish(self, 1006, "")
      return
    end
  end
  free_writer(self)
end

-- Queues a frame (header, payload); `waiter`: the task that will park until it is written
-- (not counted against send_queue: its task is the bound). Returns the queue entry, or nil,
-- err, code when the queue is full.
local function enqueue(self, h, p, waiter)
  if self.state ~= "open" and self.state ~= "closing" then return nil, "closed", "closed" end
  local q = self._outq
  if not q then q = { first = 1, last = 0 } self._outq = q end
  if not waiter and q.last - q.first + 1 >= self.send_queue then
    if self.on_full == "drop" then return nil, "send queue full", "full" end
    finish(self, 1006, "send queue full")
    return nil, "closed", "closed"
  end
  local e = { h, p, waiter }
  q.last = q.last + 1
  q[q.last] = e
  if not self._writer then self._writer = mw.spawn(writer_task, self) end
  return e
end

-- Lets the writer slot go: to the writer task if frames were queued meanwhile.
local function release(self)
  local q = self._outq
  if q and q.first <= q.last then self._writer = mw.spawn(writer_task, self) else free_writer(self) end
end

-- With the slot held: writes h, p (waiting while the socket is full); a failure ends the
-- connection. A wait the task gives up (a timeout, a cancel) does not: the frame is half
-- out, so the queue's writer takes over the slot and sends the rest first, and the caller
-- gets nil, err, code (its message still goes out, as a queued one's does) and that first
-- queue entry, whose second string is still "": a fragmented message puts its other
-- frames there, so that they follow before anything queued meanwhile. (The writer starts
-- at the loop's next turn: until the caller returns, the entry is still first.)
local function write_held(self, h, p)
  local ok, err, code, sent = self.sock:write(h, p)
  if ok then return true end
  if (code == "timeout" or code == "cancelled") and self.state ~= "closed" then
    local rest = sent < #h and h:sub(sent + 1) .. p or p:sub(sent - #h + 1)
    local q = self._outq
    if not q then q = { first = 1, last = 0 } self._outq = q end
    local e = { rest, "", false }
    q.first = q.first - 1
    q[q.first] = e
    self._writer = mw.spawn(writer_task, self)
    return nil, err, code, e
  end
  free_writer(self)
  finish(self, 1006, "")
  return nil, err, code
end

-- The slot is taken: queues a message's frames (h, p) and waits until they are written.
local function queue_and_wait(self, h, p)
  local me = current()
  local e, err, code = enqueue(self, h, p, me)
  if not e or not me then return e and true, err, code end
  local ok
  ok, err, code = park()
  if ok then return true end
  -- (cancelled, timed out: the frame still goes out in its turn, nobody waits for it; from
  -- now on it counts against send_queue as a broadcast's does)
  e[3] = false
  local q = self._outq
  if q and q[q.first] ~= e and q.last - q.first + 1 > self.send_queue then
    if self.on_full == "drop" then
      -- not begun (still queued behind another): never sent
      if q[q.last] == e then
        q[q.last] = nil
        q.last = q.last - 1
      else
        e[1], e[2] = "", ""
      end
    else
      finish(self, 1006, "send queue full")
    end
  end
  return nil, err, code
end

-- What try_send left (it did not send the whole frame): false, the unsent bytes, which
-- are written now, before the slot is let go; or nil, err, code.
local function sent_part(self, done, rest, code)
  if done == nil then
    finish(self, 1006, "")
    return nil, rest, code
  end
  self._writer = current() or false
  local ok, err
  ok, err, code = write_held(self, rest, "")
  if ok then release(self) end
  return ok, err, code
end

-- Sends one frame of opcode `op` (see above); a control frame never waits for the slot.
-- (ws:send begins with the first three lines itself: one call less per message)
local function send_frame(self, op, payload, fin, rsv1)
  if not self._writer then
    local done, rest, code = try_send(self.wc, op, payload, fin, rsv1)
    if done then return true end
    return sent_part(self, done, rest, code)
  end
  local h, p = self.wc:encode(op, payload, fin, rsv1)
  if op < OP.close then return queue_and_wait(self, h, p) end
  local pong = self._pong
  if pong and op == OP.pong then
    pong[1], pong[2] = h, p      -- answer only the latest ping
    return true
  end
  local e, err, code = enqueue(self, h, p)
  if not e then return nil, err, code end
  if op == OP.pong then self._pong = e end
  return true
end

-- The frames of a message in frames of `fs` bytes from byte `from` on, as one string.
-- (The payload is compressed whole before it is cut, so this is framing only: the
-- compression context is not touched.)
local function encode_frames(wc, op, payload, fs, rsv1, from)
  local n, frames = #payload, {}
  for pos = from, n, fs do
    frames[#frames + 1], frames[#frames + 2] = wc:encode(pos == 1 and op or OP.continuation,
      payload:sub(pos, pos + fs - 1), pos + fs > n, pos == 1 and rsv1)
  end
  return table.concat(frames)
end

-- A message in frames of `fs` bytes: the slot is held from the first to the last, so that
-- no other message comes between them (control frames wait too). A task that gives up
-- waiting in between leaves the frames not yet sent to the queue's writer, right behind
-- the one it was writing: the message goes out whole, as a queued one does.
local function send_fragments(self, op, payload, fs, rsv1)
  local n, wc = #payload, self.wc
  if self._writer then
    return queue_and_wait(self, encode_frames(wc, op, payload, fs, rsv1, 1), "")
  end
  self._writer = current() or false
  for pos = 1, n, fs do
    local h, p = wc:encode(pos == 1 and op or OP.continuation, payload:sub(pos, pos + fs - 1), pos + fs > n,
      pos == 1 and rsv1)
    local ok, err, code, e = write_held(self, h, p)
    if not ok then
      if e then e[2] = encode_frames(wc, op, payload, fs, rsv1, pos + fs) end
      return nil, err, code
    end
  end
  release(self)
  return true
end

local function send_control(self, op, payload)
  return send_frame(self, op, payload, true, false)
end

-- A lingering close (mw._linger, as the HTTP server's) reads at most this much: a peer may
-- be in the middle of a message far over max_message when it is told, and sends the rest
-- first.
local LINGER_BYTES = 64 * 1024 * 1024

-- The peer broke the protocol, or went quiet: answer with the close code (after the frame
-- being written, if any) and drop the connection. `reading`: called by the task that reads
-- the connection (a broken frame), which then lingers so that the peer reads the code.
-- An endpoint sends one close frame (RFC 6455 5.5.1): when closing, ours is out or queued
-- already, and it still goes before the end; while this one waits to go out, the state is
-- "closing", so that no other task sends a close frame, or a message, after it. (The
-- reading task counts as reading meanwhile: a close() in another task waits for the end
-- rather than read beside the linger.)
local function fail(self, code, msg, reading)
  if self.state == "open" or self.state == "closing" then
    if reading then self._reader = true end
    if self.state == "open" then
      self.state = "closing"
      local payload = string.pack(">I2", code) .. msg:sub(1, 120)
      if not utf8_valid(payload:sub(3)) then payload = payload:sub(1, 2) end
      mw.timeout(1, send_control, self, OP.close, payload)
    end
    if wait_writer(self, 1) and reading then pcall(mw._linger, self.sock, 2, LINGER_BYTES) end
    if reading then self._reader = false end
  end
  finish(self, code, msg)
end

-- What receive_frame's results (a, b, c, d: not false) mean for the receiving task: a
-- message, data, kind; nil, "closed", code, reason once the connection is closed; nil, err,
-- code (timeout, cancelled: the connection stays); or AGAIN after a control frame, which is
-- answered here.
local AGAIN = {}
local function received(self, a, b, c, d)
  if a == nil then
    if math.type(c) == "integer" then
      fail(self, c, b, true)
      return nil, "closed", c, b
    elseif c == "closed" or c == "ECONNRESET" then
      -- (closed here already: another task failed the connection, e.g. the idle timeout's
      -- 1001, and closed the socket under this read; its code is the one to report)
      if self.state == "closed" then return nil, "closed", self.close_code, self.close_reason end
      finish(self, 1006, "")
      return nil, "closed", 1006, ""
    end
    return nil, b, c
  end
  if self._tuned and self.idle_timeout then self._last_rx = mw.now() end
  if b == "text" or b == "binary" then return a, b end
  if b == "ping" then
    if self.state == "open" then send_control(self, OP.pong, a) end
  elseif b == "pong" then
    -- answers every ping with this payload still waiting (a peer may answer only the
    -- latest of several: RFC 6455 5.5.3); self.rtt is the latest one's
    local waiters = self._pings and self._pings[a]
    if waiters then
      self._pings[a] = nil
      local now = mw.now()
      for _, w in ipairs(waiters) do
        w.rtt = now - w.t0
        self.rtt = w.rtt
        unpark(w.task, w.rtt)
      end
    end
  elseif b == "close" then
    if self.state == "open" then
      -- the peer closes: echo its code, then the connection is done
      self.state = "closing"
      local echo = c == 1005 and "" or string.pack(">I2", c)
      mw.timeout(1, send_control, self, OP.close, echo)
    end
    -- the frame being written, then the echo queued behind it, go out before the end
    -- (RFC 6455 §5.5.1): closing now would cut the one and drop the other
    wait_writer(self, self.close_timeout)
    finish(self, c, d)
    return nil, "closed", c, d
  end
  return AGAIN
end

-- The next message (see WebSocket:receive); with `nowait`, false when none has arrived whole.
local function recv(self, timeout, nowait)
  while true do
    -- (no local below the read: a waiting task's frame stays low; see next_message)
    if self.state ~= "open" then
      if self.state == "closed" then return nil, "closed", self.close_code, self.close_reason end
      local closer = self._close_reader    -- (close() made the state "closing")
      if closer and closer ~= current() then
        -- close() is reading the peer's close frame: wait for it to finish
        add_closer(self)
        park(self.close_timeout + 1)
        return nil, "closed", self.close_code, self.close_reason
      end
    end
    if not nowait then self._reader = true end  -- a task is blocked receiving (close() then waits for it)
    local a, b, c, d = receive_frame(self.wc, timeout, nowait)
    if not nowait then self._reader = false end
    if not a and a ~= nil then return false end     -- (tests first: each == costs a call)
    -- (received's first case, inline)
    if a and not self._tuned and (b == "text" or b == "binary") then
      if self._closers then reader_left(self) end
      return a, b
    end
    a, b, c, d = received(self, a, b, c, d)
    if a ~= AGAIN then
      if self._closers then reader_left(self) end
      return a, b, c, d
    end
  end
end

-- ws:receive and ws:messages are not for a connection with a message handler
local function check_unhandled(self, fname)
  if self._on_message then
    error(("ws:%s: this connection's messages go to its on('message') handler"):format(fname), 3)
  end
end

-- ws:messages()'s iterator: the next message, or nil (and why) once the connection is
-- closed, which ends the loop. One function for every connection, and recv's loop again with
-- no timeout, in a frame with one register below the read: what a task waiting here holds on
-- its stack is the least it can be (see docs/websocket.md, "What an idle connection costs").
local function next_message(self)
  while self.state == "open" do
    self._reader = true
    local a, b, c, d = receive_frame(self.wc)
    self._reader = false
    if a and not self._tuned and (b == "text" or b == "binary") then
      if self._closers then reader_left(self) end
      return a, b
    end
    a, b, c, d = received(self, a, b, c, d)
    if a ~= AGAIN then
      if self._closers then reader_left(self) end
      return a, b, c, d
    end
  end
  return recv(self)
end

--- Receives the next message: data, "text"|"binary"; or nil, "closed", code, reason once
-- the connection is closed; or nil, err, code (timeout, cancelled: the connection stays).
function WebSocket:receive(timeout)
  check_unhandled(self, "receive")
  if timeout == nil then return next_message(self) end
  -- (numbers or numeric strings, as every timeout: docs/api.md)
  if not tonumber(timeout) then argerror(1, "receive", "number expected, got " .. type(timeout)) end
  return recv(self, timeout)
end

--- for msg, kind in ws:messages() do ... end (ends when the connection closes)
function WebSocket:messages()
  check_unhandled(self, "messages")
  return next_message, self
end

local function check_kind(kind, fname)
  if kind == nil then return "text" end
  if kind ~= "text" and kind ~= "binary" then argerror(2, fname, "'text' or 'binary' expected") end
  return kind
end

--- Sends a message (fragmented when fragment_size is set; compressed above the threshold
-- when permessage-deflate was negotiated).
function WebSocket:send(data, kind)
  if type(data) ~= "string" then argerror(1, "send", "string expected, got " .. type(data)) end
  if kind == nil then kind = "text" else kind = check_kind(kind, "send") end
  if kind == "text" and not utf8_valid(data) then argerror(1, "send", "text message is not valid UTF-8") end
  if self.state ~= "open" then return nil, "closed", "closed" end
  local payload, rsv1 = data, false
  if self._deflate and #data >= self.deflate_threshold then
    payload, rsv1 = self.wc:deflate(data), true
  end
  local fs = self._tuned and self.fragment_size
  if fs and #payload > fs then return send_fragments(self, OP[kind], payload, fs, rsv1) end
  if not self._writer then       -- (send_frame's start, inline)
    local done, rest, code = try_send(self.wc, OP[kind], payload, true, rsv1)
    if done then return true end
    return sent_part(self, done, rest, code)
  end
  return send_frame(self, OP[kind], payload, true, rsv1)
end
-- Its common case (a message at once, nobody writing, nothing to fragment or compress) is in
-- C (core.ws_send), which calls this function for the rest and sent_part for what the socket
-- did not take: a task sending from its handler adds no Lua frame to its stack (see
-- docs/websocket.md). ws_send_spec runs the same cases through both.
WebSocket.send = core.ws_send(WebSocket.send, sent_part)

-- The bytes at the end of s that begin a UTF-8 sequence not yet complete (0 to 3): a text
-- message written in pieces may split a character between two of them.
local function utf8_open_tail(s)
  local n = #s
  for back = 1, math.min(3, n) do
    local b = s:byte(n - back + 1)
    if b >= 0xC0 then                                   -- a lead byte: how long its sequence is
      local len = b >= 0xF0 and 4 or b >= 0xE0 and 3 or 2
      return len > back and back or 0
    elseif b < 0x80 then
      return 0
    end
  end
  return 0
end

--- A writer for a message whose size is not known up front: w:write(chunk) sends a frame,
-- w:close() ends the message. Not compressed. A text message is held to UTF-8 as ws:send
-- holds one, a character split between two pieces included.
function WebSocket:writer(kind)
  kind = check_kind(kind, "writer")
  local ws, first, done = self, true, false
  local carry = ""     -- (text: an unfinished character from the last piece, checked with the next)
  local w = {}
  function w.write(_, chunk)
    if type(chunk) ~= "string" then argerror(1, "write", "string expected, got " .. type(chunk)) end
    if done then error("message writer already closed", 2) end
    if kind == "text" then
      local whole = carry .. chunk
      local open = utf8_open_tail(whole)
      if not utf8_valid(whole:sub(1, #whole - open)) then
        argerror(1, "write", "text message is not valid UTF-8")
      end
      carry = whole:sub(#whole - open + 1)
    end
    if ws.state ~= "open" then return nil, "closed", "closed" end
    local op = first and OP[kind] or OP.continuation
    first = false
    return send_frame(ws, op, chunk, false, false)
  end
  function w.close()
    if done then return true end
    if carry ~= "" then error("text message ends inside a UTF-8 character", 2) end
    done = true
    if ws.state ~= "open" then return nil, "closed", "closed" end
    return send_frame(ws, first and OP[kind] or OP.continuation, "", true, false)
  end
  return w
end

--- What waits in the send queue for the writer: frames, bytes (not what a blocked writer is
-- writing now).
function WebSocket:buffered()
  local q = self._outq
  if not q then return 0, 0 end
  local bytes = 0
  for i = q.first, q.last do bytes = bytes + #q[i][1] + #q[i][2] end
  return q.last - q.first + 1, bytes
end

--- Sends a ping and waits for its pong (another task must be receiving): returns the round
-- trip in seconds, or nil, err, code.
function WebSocket:ping(data, timeout)
  if data ~= nil and (type(data) ~= "string" or #data > 125) then
    argerror(1, "ping", "string of at most 125 bytes expected")
  end
  if timeout ~= nil and not tonumber(timeout) then   -- (numbers or numeric strings, as every timeout: docs/api.md)
    argerror(2, "ping", "number expected, got " .. type(timeout))
  end
  if self.state ~= "open" then return nil, "closed", "closed" end
  data = data or random(8)
  local me = current()
  if not me then error("blocking call outside a task", 2) end
  -- (a list per payload: tasks pinging with the same payload each get the pong)
  local waiter = { t0 = mw.now(), task = me }
  local pings = self._pings
  if not pings then pings = {} self._pings = pings end
  local waiters = pings[data]
  if not waiters then waiters = {} pings[data] = waiters end
  waiters[#waiters + 1] = waiter
  local ok, err, code = send_control(self, OP.ping, data)
  -- (sending may have waited: the pong, or the end, may have come meanwhile)
  if ok and not waiter.rtt and not waiter.closed then
    local _
    _, err, code = park(timeout)
  end
  if waiter.rtt then return waiter.rtt end
  if waiter.closed then return nil, "closed", "closed" end
  -- (failed, timed out, cancelled: no longer waiting)
  for i = #waiters, 1, -1 do
    if waiters[i] == waiter then table.remove(waiters, i) end
  end
  if waiters[1] == nil and self._pings and self._pings[data] == waiters then self._pings[data] = nil end
  return nil, err, code
end

--- Closes with the close handshake (waits for the peer's close frame at most close_timeout).
function WebSocket:close(code, reason)
  code = code or 1000
  reason = reason or ""
  if math.type(code) ~= "integer" or not valid_send_code(code) then
    argerror(1, "close", "close code 1000-1003, 1007-1014 or 3000-4999 expected")
  end
  if type(reason) ~= "string" or #reason > 123 or not utf8_valid(reason) then
    argerror(2, "close", "UTF-8 string of at most 123 bytes expected")
  end
  if self.state == "closed" then return true end
  if self.state == "open" then
    self.state = "closing"
    self.close_code, self.close_reason = code, reason
    local ok = mw.timeout(self.close_timeout, send_control, self, OP.close, string.pack(">I2", code) .. reason)
    if not ok then
      finish(self, 1006, "")
      return true
    end
  end
  -- wait for the peer's close: through the reading task if there is one (which wakes us
  -- if it leaves without that frame: then read in its place), else read here
  local deadline = mw.now() + self.close_timeout
  local rewatch_after = false
  while self.state ~= "closed" do
    local left = deadline - mw.now()
    if left <= 0 then break end
    if self._reader then
      add_closer(self)
      if not park(left) then break end
    else
      -- a message handler's socket is watched while no message is being handled: read here
      -- instead, and watch again after, so that its close handler runs
      rewatch_after = self._pump == PUMP_WATCHED and unwatch(self.sock)
      self._close_reader = current()
      while self.state ~= "closed" do
        left = deadline - mw.now()
        if left <= 0 then break end
        local msg, err, c = recv(self, left)
        if msg == nil and err ~= "closed" and c ~= nil then break end
      end
      self._close_reader = nil
      break
    end
  end
  -- no close frame from the peer in time: an abnormal closure (RFC 6455 7.1.5)
  if self.state ~= "closed" then finish(self, 1006, "") end
  if rewatch_after then watch(self.sock, M._pump, self) end
  return true
end

-- ---------------------------------------------------------------------------------------
-- message handlers: a connection without a task

local function report(self, what, err)
  local srv = self._srv
  local line = ("moonwire: WebSocket %s error: %s"):format(what, tostring(err))
  if srv then srv.error_log(line) else io.stderr:write(line, "\n") end
end

-- The close handler of a connection read by a task (ws:receive, ws:messages) rather than a
-- message handler, once it is closed.
function close_handler_task(self)
  local ok, err = xpcall(self._on_close, traceback, self, self.close_code, self.close_reason)
  if not ok then report(self, "close handler", err) end
end

-- A handled connection's messages, in order, to its handler; then, when no whole message
-- is left, the socket is watched again, so an idle connection holds no task. Once the
-- connection is closed, the close handler.
local function pump_messages(self)
  local sock = self.sock
  while true do
    local msg, kind, code, reason = recv(self, nil, true)
    if msg then
      self._on_message(self, msg, kind)
      -- nothing more to read now? then watch (without another read that finds nothing)
      self._pump = PUMP_WATCHED
      if rewatch(sock) then return end
      self._pump = PUMP_BUSY
    elseif msg == false then
      self._pump = PUMP_WATCHED
      watch(sock)
      return
    elseif kind == "closed" then
      self._pump = PUMP_ENDED
      unwatch(sock)
      local on_close = self._on_close
      if on_close then on_close(self, code, reason) end
      return
    else
      finish(self, 1006, "")     -- an I/O error: the connection is gone
    end
  end
end

-- Runs in a worker task (see core.watch) when a handled connection's socket is readable.
-- A handler that raises is logged and the connection closed (1011), then pumped until its
-- close handler ran; then the server forgets it.
function M._pump(self)
  repeat
    self._pump = PUMP_BUSY
    local ok, err = xpcall(pump_messages, traceback, self)
    if ok and self._pump ~= PUMP_ENDED then return end     -- (the common case: watched again)
    if not ok then
      report(self, self._pump == PUMP_ENDED and "close handler" or "message handler", err)
      if self.state == "open" then self:close(1011) end
    end
  until self._pump == PUMP_ENDED
  local srv = self._srv
  if srv then srv:_ws_done(self) end
end

--- ws:on("message", fn): from now on fn(ws, data, kind) gets every message, in order, in a
-- task of its own (it may block; the next message waits for it); ws:receive() is not used.
-- The connection then needs no task of its own: a server handler may return and leave it
-- open. ws:on("close", fn): fn(ws, code, reason) runs once the connection is closed.
-- A handler that raises is logged and the connection closed with 1011. Returns ws.
function WebSocket:on(event, fn)
  if event ~= "message" and event ~= "close" then argerror(1, "on", "'message' or 'close' expected") end
  if type(fn) ~= "function" then argerror(2, "on", "function expected, got " .. type(fn)) end
  if event == "close" then
    local first = not self._on_close
    self._on_close = fn
    -- set after the end, and no message handler to run it: it runs now (once)
    if first and self.state == "closed" and not self._on_message then mw.spawn(close_handler_task, self) end
    return self
  end
  if self._on_message then
    self._on_message = fn
    return self
  end
  if self._reader or self._close_reader then error("ws:on: a task is receiving on this connection", 2) end
  if not current() then error("ws:on: called outside a task", 2) end
  self._on_message = fn
  self._pump = PUMP_WATCHED
  watch(self.sock, M._pump, self)
  return self
end

function WebSocket:__close() self:close(1001) end

--- ws:join(topic [, ps]): the messages published on the topic from now on (moonwire.pubsub;
-- ps: pubsub.default() unless given; what a subscriber gets, docs/pubsub.md) are sent to this
-- connection, framed once per process and queued like a broadcast. Left by ws:leave(topic) or
-- when the connection closes.
function WebSocket:join(topic, ps)
  if type(topic) ~= "string" then argerror(1, "join", "string expected, got " .. type(topic)) end
  -- (anything else raised "attempt to index a number value" or "attempt to call a nil value")
  local mt = getmetatable(ps)
  if ps ~= nil and (type(mt) ~= "table" or mt.__name ~= "moonwire.PubSub") then
    argerror(2, "join", "pubsub instance expected, got " .. type(ps))
  end
  return (ps or require("moonwire.pubsub").default()):join(self, topic)
end

--- ws:leave(topic) -> whether it was a member
function WebSocket:leave(topic)
  if type(topic) ~= "string" then argerror(1, "leave", "string expected, got " .. type(topic)) end
  local ps = self._topics and self._topics[topic]
  return ps and ps:leave(self, topic) or false
end

-- A broadcast's member that ws_send_all left to Lua (a writer busy, deflate, a client's
-- masked frame, a closed socket): framed for it, sent at once or queued. Returns 1 when the
-- message went out or was queued, else 0.
local function broadcast_one(ws, op, data, frame, shared_z)
  if ws.state ~= "open" then return 0 end
  local h, p
  local d = ws._deflate
  if d and #data >= ws.deflate_threshold then
    if d.tx_no_context_takeover and not ws.wc_client then
      local z = shared_z[d.tx_bits]
      if not z then
        local zp = ws.wc:deflate(data)
        z = { ws.wc:encode(op, zp, true, true) }
        shared_z[d.tx_bits] = z
      end
      h, p = z[1], z[2]
    else
      h, p = ws.wc:encode(op, ws.wc:deflate(data), true, true)
    end
  elseif not ws._writer then
    -- nobody writes: one write now, as send_frame's first step does (a writer task per
    -- member per message cost five times more); only what the socket did not take is queued
    local done, rest = try_send(ws.wc, op, data, true, false)
    if done then return 1 end
    if done == nil then
      finish(ws, 1006, "")
      return 0
    end
    h, p = rest, ""
  elseif ws.wc_client then
    h, p = ws.wc:encode(op, data, true, false)
  else
    h, p = frame, ""
  end
  return enqueue(ws, h, p) and 1 or 0
end

--- Sends one message to many connections: framed (and compressed, where receivers share
-- the parameters and reset their context) once, the same bytes queued to every connection;
-- a slow receiver never holds the others up (see send_queue / on_full).
-- The walk over the members is C's (ws_send_all: the one frame to each server-side member
-- nobody writes on, at once, as try_send would send it; in batches through io_uring where
-- the kernel offers it); the other members, and what a socket did not take, come back here.
function M.broadcast(list, data, kind)
  if type(list) ~= "table" then argerror(1, "broadcast", "table expected, got " .. type(list)) end
  if type(data) ~= "string" then argerror(2, "broadcast", "string expected, got " .. type(data)) end
  kind = kind or "text"
  if kind ~= "text" and kind ~= "binary" then argerror(3, "broadcast", "'text' or 'binary' expected") end
  -- (as ws:send: a receiver would fail the connection with 1007)
  if kind == "text" and not utf8_valid(data) then argerror(2, "broadcast", "text message is not valid UTF-8") end
  if list[1] == nil then return 0 end
  local op = OP[kind]
  local frame = ws_frame(op, data)
  local sent, left = ws_send_all(list, frame, #data)
  if not left then return sent end
  -- (after the walk: closing a member here makes it leave its topics, which changes the list)
  local shared_z
  for j = 1, #left, 3 do
    local ws, how = left[j], left[j + 1]
    if how == 0 then
      shared_z = shared_z or {}
      sent = sent + broadcast_one(ws, op, data, frame, shared_z)
    elseif how == 1 then
      if enqueue(ws, left[j + 2], "") then sent = sent + 1 end
    else
      finish(ws, 1006, "")
    end
  end
  return sent
end

function M._keepalive(self)
  local interval = self.ping_interval or self.idle_timeout
  while self.state == "open" do
    mw.sleep(interval)
    if self.state ~= "open" then return end
    -- (bytes of a message still arriving in pieces count too: only whole messages reach
    -- received(), the socket knows every read)
    if self.idle_timeout and mw.now() - math.max(self._last_rx, self.sock:_last_read() or 0) > self.idle_timeout then
      fail(self, 1001, "idle timeout")
      return
    end
    if self.ping_interval then send_control(self, OP.ping, "") end
  end
end

-- ---------------------------------------------------------------------------------------
-- permessage-deflate negotiation

local function parse_extensions(value)
  local offers = {}
  if not value then return offers end
  for ext in value:gmatch("[^,]+") do
    local parts = {}
    for part in ext:gmatch("[^;]+") do parts[#parts + 1] = part:match("^%s*(.-)%s*$") end
    local offer = { name = (parts[1] or ""):lower(), params = {} }
    for i = 2, #parts do
      local k, eq, v = parts[i]:match("^([^=]+)(=?)(.*)$")
      if k then
        k = k:match("^%s*(.-)%s*$"):lower()
        v = v:match("^%s*\"?(.-)\"?%s*$")
        if offer.params[k] ~= nil then offer.bad = true end
        -- a parameter without "=" is a flag (true); with it, its value, "" when empty (which
        -- no parameter takes: the offer is declined)
        offer.params[k] = eq == "" and true or v
      end
    end
    offers[#offers + 1] = offer
  end
  return offers
end
M._parse_extensions = parse_extensions

local function bits_param(v, allow_flag)
  if v == true then return allow_flag and true or nil end
  if type(v) ~= "string" or not v:match("^%d%d?$") then return nil end
  local n = tonumber(v)
  if n < 8 or n > 15 then return nil end
  return n
end

-- Server side: picks an acceptable permessage-deflate offer; returns the response value and
-- the C parameters, or nil.
local function accept_deflate(header, prefs)
  if not header then return nil end
  for _, offer in ipairs(parse_extensions(header)) do
    if offer.name == "permessage-deflate" and not offer.bad then
      local p, ok = offer.params, true
      local resp = { "permessage-deflate" }
      local c = { rx_bits = 15, tx_bits = 15 }
      for k, v in pairs(p) do
        if k == "server_no_context_takeover" then
          if v ~= true then ok = false end
        elseif k == "client_no_context_takeover" then
          if v ~= true then ok = false end
        elseif k == "server_max_window_bits" then
          -- (8 included: zlib's deflate, at its least window of 9 bits, refers at most 250
          -- bytes back; see ws_deflate in src/ws.c)
          local n = bits_param(v, false)
          if not n then ok = false else c.tx_bits = n end
        elseif k == "client_max_window_bits" then
          if not bits_param(v, true) then ok = false end
        else
          ok = false
        end
      end
      if ok then
        if p.server_no_context_takeover or prefs.server_no_context_takeover then
          resp[#resp + 1] = "server_no_context_takeover"
          c.tx_no_context_takeover = true
        end
        if p.client_no_context_takeover or prefs.client_no_context_takeover then
          resp[#resp + 1] = "client_no_context_takeover"
          c.rx_no_context_takeover = true
        end
        if p.server_max_window_bits then resp[#resp + 1] = "server_max_window_bits=" .. c.tx_bits end
        return table.concat(resp, "; "), c
      end
    end
  end
end

-- ---------------------------------------------------------------------------------------
-- server handshake

-- Whether a comma-separated header value lists token (lower case). (Not with gmatch: its
-- iterator makes two objects, about 700 bytes, and every handshake checks two headers; what
-- a handshake leaves behind adds to what 10,000s of connections opened in a row cost.)
local function has_token(value, token)
  if not value then return false end
  local pos = 1
  repeat
    local comma = value:find(",", pos, true)
    if value:sub(pos, comma and comma - 1):match("^%s*(.-)%s*$"):lower() == token then return true end
    pos = comma and comma + 1
  until not pos
  return false
end

local function refuse(res, status, msg, extra)
  res:status(status)
  res:header("content-type", "text/plain; charset=utf-8")
  for k, v in pairs(extra or {}) do res:header(k, v) end
  res[res.slots.CLOSE] = true
  res:send(msg .. "\n")
  return nil, msg, status
end

local function origin_allowed(origins, origin)
  if origins == nil then return true end
  if type(origins) == "function" then return origins(origin) end
  for _, o in ipairs(origins) do
    if o == origin then return true end
  end
  return false
end

--- Upgrades a request: req:websocket(opts) -> ws | nil, err, status (the refusal is sent).
local no_opts = {}
-- a Sec-WebSocket-Key: 16 bytes in base64
local KEY_PATTERN = "^" .. ("[%w+/]"):rep(22) .. "==$"

-- What both HTTP versions negotiate the same way: the version, the origin, a subprotocol,
-- permessage-deflate. true, protocol, ext, dparams; or nil, msg, status (refused: sent).
local function negotiate(res, h, opts)
  if h["sec-websocket-version"] ~= "13" then
    return refuse(res, 426, "unsupported WebSocket version",
      { ["sec-websocket-version"] = "13", upgrade = "websocket", connection = "Upgrade" })
  end
  if not origin_allowed(opts.origins, h.origin) then
    return refuse(res, 403, "origin not allowed")
  end
  local protocol
  if opts.protocols and h["sec-websocket-protocol"] then
    local offered = {}
    for p in h["sec-websocket-protocol"]:gmatch("[^,%s]+") do offered[p] = true end
    for _, p in ipairs(opts.protocols) do
      if offered[p] then protocol = p break end
    end
  end
  local ext, dparams
  if opts.deflate ~= false then
    local prefs = type(opts.deflate) == "table" and opts.deflate or no_opts
    ext, dparams = accept_deflate(h["sec-websocket-extensions"], prefs)
  end
  return true, protocol, ext, dparams
end

-- The handler's headers that the answer accepting a WebSocket (HTTP/1.1's 101, HTTP/2's
-- 200) does not carry: the handshake's own fields, negotiated here, and those that neither a
-- 101 nor a 2xx to a CONNECT may have (hop-by-hop ones, a body's framing: RFC 9110 §7.6.1,
-- §9.3.6). The others (a cookie set before req:websocket()) go out on both versions.
local NOT_IN_ANSWER = { upgrade = true, connection = true, ["keep-alive"] = true, ["proxy-connection"] = true,
  te = true, trailer = true, ["transfer-encoding"] = true, ["content-length"] = true,
  ["sec-websocket-accept"] = true, ["sec-websocket-protocol"] = true, ["sec-websocket-extensions"] = true }

-- The answer's header list, for both versions: the handler's (less NOT_IN_ANSWER's), then
-- the negotiated subprotocol and extension.
local function answer_fields(res, protocol, ext)
  local slots = res.slots
  local NH, HBASE = slots.NH, slots.HBASE
  local n = res[NH]
  if n > 0 then
    local j = HBASE
    for i = HBASE, HBASE + 2 * n - 1, 2 do
      local k = res[i]
      if not NOT_IN_ANSWER[k:lower()] then
        res[j], res[j + 1] = k, res[i + 1]
        j = j + 2
      end
    end
    for i = j, HBASE + 2 * n - 1 do res[i] = false end
    res[NH] = (j - HBASE) // 2
  end
  if protocol then res:header("Sec-WebSocket-Protocol", protocol) end
  if ext then res:header("Sec-WebSocket-Extensions", ext) end
end

-- The WebSocket's socket, the same object on both versions: the connection's own (HTTP/1.1)
-- or one end of a socket pair whose other end two tasks copy to and from the HTTP/2 stream
-- (RFC 8441), so that framing, deflate, queues and close codes are one path. The tunnel
-- (res._tunnel) is over when both copies end; h2.lua waits for it before ending the stream.
-- a, b: the pair (made before the 200: without descriptors the answer is a 503).
local function h2_tunnel(st, a, b)
  st:tunnel()            -- a reset or the connection's end reaches the ws through the tasks below
  local up = mw.spawn(function()        -- DATA from the client -> the WebSocket
    while true do
      local chunk = st:read_body("chunk")
      if not chunk then break end
      if not b:write(chunk) then break end
    end
    pcall(b.shutdown, b, "write")
  end)
  local down = mw.spawn(function()      -- the WebSocket's frames -> DATA to the client
    while true do
      local data = b:recv(65536)
      if not data then break end
      if not st:write(data) then break end
    end
    pcall(st.write, st, "", true)
    up:cancel()
    b:close()
  end)
  return a, { join = function() down:join() up:join() end }
end

-- The handshake of M.upgrade (checked arguments): ws | nil, err, status.
local function handshake_server(req, res, opts)
  local h = req.headers
  local slots = res.slots
  if req.version == "2" then
    -- RFC 8441: an extended CONNECT with :protocol websocket; the answer is a 200 on the stream
    if req.method ~= "CONNECT" or req.protocol ~= "websocket" then
      return refuse(res, 400, "WebSocket over HTTP/2 needs an extended CONNECT (:protocol websocket)")
    end
    local ok, protocol, ext, dparams = negotiate(res, h, opts)
    if not ok then return nil, protocol, ext end
    -- the tunnel's socket pair before the answer: each WebSocket over HTTP/2 costs two
    -- descriptors, and without them it is refused as HTTP/1.1 refuses
    local a, b = mw.unix.pair()
    if not a then return refuse(res, 503, "no socket pair for the WebSocket: " .. tostring(b)) end
    answer_fields(res, protocol, ext)
    local st = req[1]
    local sent, err, code = st:respond(200, res, res[slots.NH], slots.HBASE, nil, false, res[slots.SRV].server_name, -1)
    if not sent then
      a:close()
      b:close()
      return nil, err, code
    end
    res.sent, res[slots.FIN], res[slots.UPGRADED] = true, true, true
    res[slots.STATUS] = 200
    local sock, tunnel = h2_tunnel(st, a, b)
    local wc = open_conn(sock, false, opts, dparams)
    local ws = new(sock, wc, opts, protocol, ext, dparams)
    -- h2.lua's serve_stream closes it after the handler as HTTP/1.1's request loop does,
    -- then waits for the tunnel; Server:close closes it with 1001 meanwhile
    tunnel.ws = ws
    res._tunnel = tunnel
    local srv = res[slots.SRV]
    ws._srv = srv         -- (its handlers' errors go to srv.error_log, as on HTTP/1.1)
    srv:_h2_upgraded(ws)
    return ws
  end
  if req.method ~= "GET" or req.version ~= "1.1" then
    return refuse(res, 400, "WebSocket handshake needs GET and HTTP/1.1")
  end
  if not has_token(h.upgrade, "websocket") then
    return refuse(res, 426, "WebSocket upgrade required", { upgrade = "websocket", connection = "Upgrade" })
  end
  if not has_token(h.connection, "upgrade") then
    return refuse(res, 400, "Connection header must contain 'Upgrade'")
  end
  local key = h["sec-websocket-key"]
  if h["sec-websocket-version"] == "13"
    and (not key or not key:match(KEY_PATTERN)) then
    return refuse(res, 400, "invalid Sec-WebSocket-Key")
  end
  local ok, protocol, ext, dparams = negotiate(res, h, opts)
  if not ok then return nil, protocol, ext end
  -- the head as HTTP/2's 200 is (Server, Date, the handler's headers, the negotiated ones)
  -- plus the 101's own fields; Connection by hand (res:header keeps it for the server)
  answer_fields(res, protocol, ext)
  res:header("Upgrade", "websocket")
  res:header("Sec-WebSocket-Accept", ws_accept(key))
  local n, HBASE = res[slots.NH], slots.HBASE
  res[HBASE + 2 * n], res[HBASE + 2 * n + 1], res[slots.NH] = "Connection", "Upgrade", n + 1
  res.sent, res[slots.FIN], res[slots.UPGRADED] = true, true, true
  res[slots.CLOSE] = true     -- (no next request on this connection)
  res[slots.STATUS] = 101
  local sock = res[slots.SOCK]
  local sent, err, code = sock:write(http_head(101, res, n + 1, -2, 0, res[slots.SRV].server_name, HBASE))
  if not sent then return nil, err, code end
  local wc = open_conn(sock, false, opts, dparams)
  local ws = new(sock, wc, opts, protocol, ext, dparams)
  local srv = res[1]    -- the server (Response.slots.SRV)
  ws._srv = srv         -- (for a handled connection's end, and its handlers' errors)
  srv:_upgraded(req, ws)
  return ws
end

-- A handshake job in a worker task (M.upgrade): job = { task, req, res, opts }; the waiting
-- task gets the job back first (so that a task that stopped waiting is not woken by it), then
-- handshake_server's results or false, the error with its traceback.
local function handshake_job(job)
  local ok, ws, err, status = xpcall(handshake_server, traceback, job[2], job[3], job[4])
  if not job.abandoned then
    if ok then unpark(job[1], job, ws, err, status) else unpark(job[1], job, false, ws) end
  end
end

function M.upgrade(req, opts)
  opts = opts or no_opts
  if type(opts) ~= "table" then argerror(1, "websocket", "table expected, got " .. type(opts)) end
  if opts ~= no_opts then check_options(opts) end
  local res = rawget(req, 2)            -- the request's response (Request.slots.RES)
  if not res or res.sent then error("websocket: the response was already sent", 3) end
  if req.version == "2" then return handshake_server(req, res, opts) end
  -- HTTP/1.1: the handshake runs in a worker task (the pool the scheduler keeps, no new task
  -- each time). A Lua stack never shrinks back to its first size while its task waits, and
  -- the handshake's frames would grow the stack of the handler's task, which a handler
  -- looping over ws:messages() keeps as long as the connection lasts: 40 slots instead of 80
  -- (docs/websocket.md, "What an idle connection costs").
  local job = { current(), req, res, opts }
  dispatch(handshake_job, job)
  local back, ws, err, status = park()
  if back ~= job then                   -- (cancelled, or a deadline passed: ws, err are why)
    job.abandoned = true
    return nil, ws, err
  end
  if ws == false then error(err, 0) end
  return ws, err, status
end

-- ---------------------------------------------------------------------------------------
-- client handshake

local function client_deflate(header, offered)
  local offers = parse_extensions(header)
  if #offers == 0 then return nil end
  if #offers > 1 or offers[1].name ~= "permessage-deflate" or not offered or offers[1].bad then
    return false, "server chose an extension we did not offer: " .. header
  end
  local c = { rx_bits = 15, tx_bits = 15 }
  for k, v in pairs(offers[1].params) do
    if k == "server_no_context_takeover" and v == true then
      c.rx_no_context_takeover = true
    elseif k == "client_no_context_takeover" and v == true then
      c.tx_no_context_takeover = true
    elseif k == "server_max_window_bits" and bits_param(v, false) then
      c.rx_bits = 15
    elseif k == "client_max_window_bits" and bits_param(v, false) then
      -- (any of 8..15: we offered the parameter without a value, RFC 7692 7.1.2.2; for 8
      -- see ws_deflate in src/ws.c)
      c.tx_bits = bits_param(v, false)
    else
      return false, "bad permessage-deflate parameter from the server: " .. k
    end
  end
  return c
end

local function handshake(u, opts)
  local sock, err, code = mw.tcp.connect(u.host, u.port, { timeout = opts.timeout,
    tls = u.scheme == "wss" and (opts.tls or true) or nil,
    local_host = opts.local_host, local_port = opts.local_port })
  if not sock then return nil, err, code end
  local key = base64(random(16))
  local flat, n = {}, 0
  local function add(k, v) flat[2 * n + 1], flat[2 * n + 2] = k, v n = n + 1 end
  add("Upgrade", "websocket")
  add("Connection", "Upgrade")
  add("Sec-WebSocket-Key", key)
  add("Sec-WebSocket-Version", "13")
  if opts.protocols then add("Sec-WebSocket-Protocol", table.concat(opts.protocols, ", ")) end
  if opts.deflate then add("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits") end
  if opts.origin then add("Origin", opts.origin) end
  local authorization = false
  for k, v in pairs(opts.headers or {}) do
    add(k, tostring(v))
    if type(k) == "string" and k:lower() == "authorization" then authorization = true end
  end
  -- the URL's userinfo as Basic credentials, as the HTTP client sends it (an Authorization
  -- header of the caller's wins)
  if u.user and not authorization then add("Authorization", "Basic " .. base64(u.user .. ":" .. (u.password or ""))) end
  local head = core.http_request_head("GET", u.target, u.authority, flat, n, -2)
  local ok
  ok, err, code = sock:write(head)
  if not ok then sock:close() return nil, err, code end
  local hc = core.http_conn(sock, { head = 65536 }, {}, true)
  local res
  res, err, code = hc:read_request(-1, -1, false)
  if not res then sock:close() return nil, "handshake: " .. tostring(err), code end
  local h = setmetatable(res.headers, { __index = function(t, k) return rawget(t, k:lower()) end })
  local function bad(msg) sock:close() return nil, "handshake: " .. msg, "handshake" end
  if res.status ~= 101 then return bad("server answered " .. res.status .. " " .. (res.reason or "")) end
  if not has_token(h.upgrade, "websocket") or not has_token(h.connection, "upgrade") then
    return bad("missing Upgrade/Connection in the server's answer")
  end
  if h["sec-websocket-accept"] ~= ws_accept(key) then return bad("wrong Sec-WebSocket-Accept") end
  local protocol = h["sec-websocket-protocol"]
  if protocol then
    local offered = false
    for _, p in ipairs(opts.protocols or {}) do if p == protocol then offered = true end end
    if not offered then return bad("server chose a subprotocol we did not offer: " .. protocol) end
  end
  local dparams, derr = client_deflate(h["sec-websocket-extensions"], opts.deflate)
  if dparams == false then return bad(derr) end
  local wc = open_conn(sock, true, opts, dparams)
  local ws = new(sock, wc, opts, protocol, h["sec-websocket-extensions"], dparams)
  ws.wc_client = true
  return ws
end

--- mw.websocket.connect(url, { headers, protocols, deflate, timeout, max_message, origin, ... })
function M.connect(target, opts)
  if type(target) ~= "string" then argerror(1, "connect", "string expected, got " .. type(target)) end
  if opts ~= nil and type(opts) ~= "table" then argerror(2, "connect", "table expected, got " .. type(opts)) end
  opts = opts or no_opts
  check_options(opts)
  local u, err = url.parse(target)
  if not u then return nil, err, "EINVAL" end
  if u.scheme ~= "ws" and u.scheme ~= "wss" then
    return nil, "unsupported URL scheme '" .. u.scheme .. "'", "EINVAL"
  end
  -- RFC 6455 3: "Fragment identifiers are meaningless in the context of WebSocket URIs and
  -- MUST NOT be used on these URIs"
  if u.fragment then return nil, "a WebSocket URL has no fragment (#" .. u.fragment .. ")", "EINVAL" end
  if opts.timeout then return mw.timeout(opts.timeout, handshake, u, opts) end
  return handshake(u, opts)
end

return M
