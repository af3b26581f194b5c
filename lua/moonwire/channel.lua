--- Channels: FIFO queues between tasks, with an optional buffer.
-- Built on the core's park/unpark primitive: a blocked sender or receiver parks its task
-- and is queued here; the other side unparks it with the value (or the failure).
local core = require "moonwire.core"

-- task(): the running task; raises as the core's blocking calls do outside a task (or in a
-- coroutine nested in one)
local park, unpark, task = core.park, core.unpark, core.task

local Channel = {}
Channel.__index = Channel
Channel.__name = "moonwire.Channel"

-- A FIFO of waiting tasks. An entry whose task gave up (timeout, cancel) is dead: its value
-- is dropped at once, it leaves the queue at once when it is the last one, and the queue is
-- compacted when dead entries are more than half of it, so waits that give up leave nothing.
local function qpush(q, e)
  q.last = q.last + 1
  q[q.last] = e
end

local function qpop(q)
  while q.first <= q.last do
    local e = q[q.first]
    q[q.first] = nil
    q.first = q.first + 1
    if e.task then return e end
    q.dead = q.dead - 1
  end
end

local function newq() return { first = 1, last = 0, dead = 0 } end

-- Drops an entry still queued whose task gave up.
local function qforget(q, entry)
  entry.task, entry.value = nil, nil
  q.dead = q.dead + 1
  while q.last >= q.first and not q[q.last].task do   -- dead entries at the end
    q[q.last] = nil
    q.last = q.last - 1
    q.dead = q.dead - 1
  end
  if q.dead * 2 > q.last - q.first + 1 then
    local j = q.first
    for i = q.first, q.last do
      local e = q[i]
      q[i] = nil
      if e.task then q[j] = e; j = j + 1 end
    end
    q.last = j - 1
    q.dead = 0
  end
end

local function check(self, fname)
  if getmetatable(self) ~= Channel then
    error(("bad argument #1 to '%s' (moonwire.Channel expected, got %s)"):format(fname, type(self)), 3)
  end
end

local function wait(q, entry, timeout)
  qpush(q, entry)
  local v, err, code = park(timeout)
  -- still queued (task set): nobody took it, the wait gave up
  if entry.task then qforget(q, entry) end
  if v == nil then return nil, err, code end
  return v
end

-- A timeout: nil, a number or a numeric string (as for the core's timeouts); NaN raises.
local function checktimeout(fname, n, timeout)
  if timeout == nil then return nil end
  local s = tonumber(timeout)
  if type(timeout) ~= "number" and (type(timeout) ~= "string" or not s) then
    error(("bad argument #%d to '%s' (number expected, got %s)"):format(n, fname, type(timeout)), 3)
  end
  if s ~= s then error(("bad argument #%d to '%s' (not a number)"):format(n, fname), 3) end
  return s
end

function Channel:send(value, timeout)
  check(self, "send")
  if value == nil then error("bad argument #1 to 'send' (value expected)", 2) end
  timeout = checktimeout("send", 2, timeout)
  local me = task()   -- raises as the core does outside a task
  if self._closed then return nil, "closed", "closed" end
  -- a receiver already waiting takes the value directly
  local r = qpop(self._recvq)
  while r do
    local t = r.task
    r.task = nil
    if unpark(t, value) then return true end
    r = qpop(self._recvq)
  end
  if self._n < self.capacity then
    self._tail = self._tail + 1
    self._buf[self._tail] = value
    self._n = self._n + 1
    return true
  end
  return wait(self._sendq, { task = me, value = value }, timeout)
end

-- Moves the first waiting sender's value into the buffer (after a receive made room).
local function admit_sender(self)
  local s = qpop(self._sendq)
  while s do
    local t = s.task
    s.task = nil
    if unpark(t, true) then
      self._tail = self._tail + 1
      self._buf[self._tail] = s.value
      self._n = self._n + 1
      return
    end
    s = qpop(self._sendq)
  end
end

function Channel:recv(timeout)
  check(self, "recv")
  timeout = checktimeout("recv", 1, timeout)
  local me = task()   -- raises as the core does outside a task
  if self._n > 0 then
    local h = self._head
    local v = self._buf[h]
    self._buf[h] = nil
    self._head = h + 1
    self._n = self._n - 1
    admit_sender(self)
    return v
  end
  -- rendezvous: take straight from a waiting sender
  local s = qpop(self._sendq)
  while s do
    local t = s.task
    s.task = nil
    if unpark(t, true) then return s.value end
    s = qpop(self._sendq)
  end
  if self._closed then return nil, "closed", "closed" end
  return wait(self._recvq, { task = me }, timeout)
end

function Channel:close()
  check(self, "close")
  if self._closed then return end
  self._closed = true
  for _, q in ipairs{ self._recvq, self._sendq } do
    local e = qpop(q)
    while e do
      local t = e.task
      e.task = nil
      unpark(t, nil, "closed", "closed")
      e = qpop(q)
    end
  end
end

function Channel:closed()
  check(self, "closed")
  return self._closed
end

function Channel:count()
  check(self, "count")
  return self._n
end
Channel.__len = Channel.count

--- Iterates over received values until the channel is closed and drained.
function Channel:iter()
  check(self, "iter")
  return function()
    local v = self:recv()
    return v
  end
end

function Channel:__tostring()
  return ("moonwire.Channel (%d/%d%s)"):format(self._n, self.capacity, self._closed and ", closed" or "")
end

return function(capacity)
  if capacity == nil then capacity = 0 end
  local n = type(capacity) == "number" and math.tointeger(capacity)   -- 1.0 is 1
  if not n or n < 0 then
    error(("bad argument #1 to 'channel' (non-negative integer expected, got %s)"):format(
      type(capacity) == "number" and tostring(capacity) or type(capacity)), 2)
  end
  capacity = n
  return setmetatable({
    capacity = capacity, _buf = {}, _head = 1, _tail = 0, _n = 0, _closed = false,
    _recvq = newq(), _sendq = newq(),
  }, Channel)
end
