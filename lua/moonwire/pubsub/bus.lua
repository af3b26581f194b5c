--- moonwire.pubsub.bus: the message bus between the workers of one server (http.serve with
-- workers = N and no Redis). The supervisor listens on a Unix socket in a private temporary
-- directory; each worker connects to it after the fork and sends its publishes there; the
-- supervisor (the hub) writes every frame, unchanged, to every other worker. Frames are
-- length-prefixed (">s4"). Each peer has a bounded queue: a worker that does not read is
-- dropped from, never waited for (its drops are counted).
local mw = require "moonwire"
local core = require "moonwire.core"

local M = { queue = 4096, dropped = 0 }

local hub        -- in the supervisor: { listener, dir, peers = { [sock] = channel } }
local inherited  -- in a worker: the supervisor's objects it got through fork (closed there)

-- A writer task per socket, fed through a bounded channel; a full channel drops the frame.
local function writer(sock, ch)
  for frame in ch:iter() do
    if not sock:write(frame) then break end
  end
  sock:close()
end

local function offer(ch, frame)
  if ch:closed() or (ch:count() >= ch.capacity) then
    M.dropped = M.dropped + 1
    return nil, "bus queue full", "full"
  end
  return ch:send(frame)
end

-- Reads one frame: its bytes (length prefix included), or nil at end / failure.
local function read_frame(sock)
  local head = sock:read(4)
  if not head or #head < 4 then return nil end
  local n = string.unpack(">I4", head)
  local body = n > 0 and sock:read(n) or ""
  if not body or #body < n then return nil end
  return head .. body, body
end

--- bus.hub_start() -> path: the supervisor's side (call inside its mw.run, before forking).
function M.hub_start()
  if hub then return hub.path end
  local p = io.popen("mktemp -d /tmp/mw-bus.XXXXXX")
  local dir = p:read("l")
  p:close()
  local path = dir .. "/bus.sock"
  local l = assert(mw.unix.listen(path))
  local h = { listener = l, dir = dir, path = path, peers = {} }
  hub = h
  hub.task = mw.spawn(function()
    -- (stopped is checked first: a hub stopped before this task first ran has a closed
    -- listener, and accept on it raises)
    while not h.stopped do
      local sock = l:accept()
      if not sock then break end
      local ch = mw.channel(M.queue)
      hub.peers[sock] = ch
      mw.spawn(writer, sock, ch)
      mw.spawn(function()
        while true do
          local frame = read_frame(sock)
          if not frame then break end
          for other, och in pairs(hub.peers) do
            if other ~= sock then offer(och, frame) end
          end
        end
        hub.peers[sock] = nil
        ch:close()
      end)
    end
  end)
  M.path = path
  return path
end

--- bus.hub_stop(): closes the hub and removes its directory.
function M.hub_stop()
  if not hub then return end
  hub.stopped = true
  hub.listener:close()
  for _, ch in pairs(hub.peers) do ch:close() end
  os.remove(hub.path)
  os.remove(hub.dir)
  hub = nil
end

--- bus.forked(): in a freshly forked worker: forget (and close) the supervisor's hub objects.
function M.forked()
  if not hub then return end
  inherited = hub
  hub = nil
  inherited.listener:close()
  for sock in pairs(inherited.peers) do sock:close() end
  inherited = nil
end

-- ---- the worker's side -------------------------------------------------------------------

local conn   -- { sock, ch, listeners = { fn, ... } } once connected

--- bus.available() -> whether this process is a worker with a bus to its siblings
function M.available() return M.path ~= nil and hub == nil end

--- bus.join(fn) -> leave | nil, err, code: from now on fn(body) gets every frame the other
-- workers send (body: the frame without its length prefix), until leave() is called (a closed
-- pubsub calls it: else its listener, and the instance with it, would live as long as the
-- process). Connects on first use (in a task).
function M.join(fn)
  if type(fn) ~= "function" then
    error("bad argument #1 to 'join' (function expected, got " .. type(fn) .. ")", 2)
  end
  local st = conn and conn.reader:status()
  if st == "done" or st == "failed" then conn = nil end   -- (its loop's run ended: a new one)
  if not conn then
    if not M.available() then return nil, "no workers bus in this process", "unavailable" end
    local sock, err, code = mw.unix.connect(M.path)
    if not sock then return nil, err, code end
    conn = { sock = sock, ch = mw.channel(M.queue), listeners = {}, pid = core.getpid() }
    mw.spawn(writer, sock, conn.ch)
    local c = conn
    c.reader = mw.spawn(function()
      while true do
        local _, body = read_frame(c.sock)
        if not body then break end
        -- (the list is replaced, never changed, when a listener leaves: one that leaves
        -- during this loop does not make it skip another)
        local ls = c.listeners
        for i = 1, #ls do
          -- one listener's error must not end this task (every later frame would be lost
          -- to all of them, silently)
          local ok, lerr = pcall(ls[i], body)
          if not ok then io.stderr:write("moonwire: workers bus listener: ", tostring(lerr), "\n") end
        end
      end
      if conn == c then conn = nil end
    end)
  end
  local c = conn
  local entry = function(body) return fn(body) end   -- a fn joined twice leaves once
  local ls = { table.unpack(c.listeners) }
  ls[#ls + 1] = entry
  c.listeners = ls
  return function()
    local keep = {}
    for _, x in ipairs(c.listeners) do if x ~= entry then keep[#keep + 1] = x end end
    c.listeners = keep
  end
end

--- bus.send(body) -> true | nil, err, code: to every other worker (never waits).
function M.send(body)
  if not conn then return nil, "workers bus not connected", "unavailable" end
  return offer(conn.ch, string.pack(">s4", body))
end

return M
