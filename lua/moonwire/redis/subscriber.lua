--- moonwire.redis.subscriber: a Redis pub/sub subscriber that stays subscribed.
-- One dedicated RESP3 connection (pushes kept) read by one task. It remembers every channel,
-- pattern and shard channel asked for; when the connection is lost it reconnects with
-- jittered exponential backoff and resubscribes all of them in one write, and tells the app
-- (on_state "down" / "up"). When nothing arrived for probe_interval it publishes a probe to its
-- own channel and expects it back within probe_timeout, else it treats the connection as dead
-- (a SIGSTOPped server, a silent failover). Messages go to on_message inline, from the reading
-- task: it must not block (moonwire.pubsub queues what it cannot hand over at once).
local mw = require "moonwire"
local core = require "moonwire.core"
local seconds = require("moonwire.opts").seconds

local M = {}

local Sub = {}
Sub.__index = Sub
Sub.__name = "moonwire.RedisSubscriber"

local KINDS = { subscribe = "SUBSCRIBE", psubscribe = "PSUBSCRIBE", ssubscribe = "SSUBSCRIBE" }
-- (Redis's names: not "UN" .. KINDS[kind], there is no UNPSUBSCRIBE)
local UNDO = { subscribe = "UNSUBSCRIBE", psubscribe = "PUNSUBSCRIBE", ssubscribe = "SUNSUBSCRIBE" }
local BATCH = 1000   -- channels per (re)subscribe command; all the commands leave in one write

local function hex(n)
  local b = core.random(n)
  return (b:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- (seconds: numbers or numeric strings, as every timeout: docs/api.md)
local function optnum(opts, k, default, level)
  local v = opts[k]
  if v == nil then return default end
  local n = seconds(v)
  if not n or n <= 0 then
    error(("bad option '%s' (positive number expected, got %s)"):format(k,
      type(v) == "number" and tostring(v) or type(v)), level + 1)
  end
  return n
end

local CALLBACKS = { "on_message", "on_state", "on_subscribed" }
local DURATIONS = { backoff_min = 0.1, backoff_max = 5, probe_interval = 5, probe_timeout = 2 }

-- The options' checks, before anything is made (also pubsub.configure's, which makes
-- nothing): raises naming the option at the caller of the function `fname` called this from.
-- Returns the durations (defaults filled in) and the connect options.
local function check(opts, fname)
  if type(opts) ~= "table" then
    error("bad argument #2 to '" .. fname .. "' (table expected, got " .. type(opts) .. ")", 3)
  end
  -- (one that is not a function was taken, and its error written to stderr at every call)
  for _, k in ipairs(CALLBACKS) do
    if opts[k] ~= nil and type(opts[k]) ~= "function" then
      error(("bad option '%s' (function expected, got %s)"):format(k, type(opts[k])), 3)
    end
  end
  local d = {}
  for k, default in pairs(DURATIONS) do d[k] = optnum(opts, k, default, 3) end
  local copts = {}
  for k, v in pairs(opts) do copts[k] = v end
  for _, k in ipairs(CALLBACKS) do copts[k] = nil end
  for k in pairs(DURATIONS) do copts[k] = nil end
  copts.url = nil
  copts.resp, copts.pushes = 3, true
  copts.max_pushes = opts.max_pushes or 100000
  copts.connect_timeout = opts.connect_timeout or (d.probe_timeout + 1)
  return d, copts
end

--- The checks redis.subscriber(target, opts) makes, and nothing else (pubsub.configure).
function M.check(target, opts, fname)
  local _, copts = check(opts, fname)
  require("moonwire.redis")._settings(target or copts, target and copts or nil, fname)
end

--- redis.subscriber(url_or_opts [, opts]) -> subscriber (it connects in its own task)
-- opts (besides the connect options): on_message(channel, data, pattern, kind),
-- on_state(state, info) ("up" | "down"), on_subscribed(channel, kind) (the server confirmed a
-- subscribe, psubscribe or ssubscribe: from then on its messages come; after each
-- reconnect too), backoff_min (0.1 s), backoff_max (5 s),
-- probe_interval (5 s), probe_timeout (2 s), connect_timeout (probe_timeout + 1).
function M.new(target, opts)
  if not mw.current() then error("redis.subscriber: called outside a task", 2) end
  if type(target) == "table" and opts == nil then opts, target = target, target.url end
  opts = opts or {}
  local d, copts = check(opts, "subscriber")
  local redis = require "moonwire.redis"
  -- a bad URL or option raises now, as connect's would (in the task, connect's error would
  -- be retried forever, unseen: the state starts "down", so on_state would not even be called)
  redis._settings(target or copts, target and copts or nil, "subscriber")
  local self = setmetatable({
    _target = target, _copts = copts, _redis = redis,
    on_message = opts.on_message or function() end,
    on_state = opts.on_state or function() end,
    on_subscribed = opts.on_subscribed,
    backoff_min = d.backoff_min, backoff_max = d.backoff_max,
    probe_interval = d.probe_interval, probe_timeout = d.probe_timeout,
    state = "down", closed = false,
    _sets = { subscribe = {}, psubscribe = {}, ssubscribe = {} },
    _probe = "mw:probe:" .. hex(8),
    stats = { connects = 0, reconnects = 0, probes = 0, probe_failures = 0, dropped = 0, messages = 0 },
  }, Sub)
  self._task = mw.spawn(M._run, self)
  return self
end

local function send_batches(conn, cmd, list)
  for i = 1, #list, BATCH do
    local ok = conn:send(cmd, table.unpack(list, i, math.min(i + BATCH - 1, #list)))
    if not ok then return false end
  end
  return true
end

local function change(self, kind, op, names)
  local set = self._sets[kind]
  local list = {}
  for i = 1, #names do
    local n = names[i]
    if type(n) ~= "string" then
      error(("bad argument #%d to '%s' (string expected, got %s)"):format(i, kind, type(n)), 3)
    end
    if (op == "add") ~= (set[n] ~= nil) then
      set[n] = op == "add" or nil
      list[#list + 1] = n
    end
  end
  local conn = self._conn
  if #list > 0 and conn and self.state == "up" then
    -- (while not up, the connection's reconcile sends it: see resubscribe)
    local sent = self._sent[kind]
    for i = 1, #list do sent[list[i]] = op == "add" or nil end
    -- a failed send is the connection failing: the reader reconnects and resubscribes
    send_batches(conn, (op == "add" and KINDS or UNDO)[kind], list)
  end
end

--- sub:subscribe(ch, ...), sub:unsubscribe(ch, ...), and the psubscribe / punsubscribe and
-- ssubscribe / sunsubscribe pairs: remembered at once, sent when connected (never wait).
for kind in pairs(KINDS) do
  Sub[kind] = function(self, ...) change(self, kind, "add", { ... }) end
  Sub[UNDO[kind]:lower()] = function(self, ...) change(self, kind, "del", { ... }) end
end

--- sub:channels(kind) -> the set of channels (or patterns) subscribed (kind: "subscribe" default)
function Sub:channels(kind)
  local set = self._sets[kind or "subscribe"]
  -- (a misspelt kind answered nil, as if nothing were subscribed)
  if not set then
    error(("bad argument #1 to 'channels' (\"subscribe\", \"psubscribe\" or \"ssubscribe\" expected, got %s)")
      :format(type(kind) == "string" and ("%q"):format(kind) or type(kind)), 2)
  end
  return set
end

local function set_state(self, state, info, force)
  if self.state == state and not force then return end
  self.state = state
  local ok, err = pcall(self.on_state, state, info)
  if not ok then io.stderr:write("moonwire: subscriber on_state: ", tostring(err), "\n") end
end

-- Sends what the wanted sets (_sets) and what this connection was sent (_sent) differ by,
-- until they agree: true and whether it sent anything, or false when a send failed (the
-- connection is failing).
-- Subscriptions made while the connection was not up yet go out here: change() sends only
-- on an up connection.
local function reconcile(self, conn)
  local any = false
  while true do
    local busy = false
    for kind, set in pairs(self._sets) do
      local sent, adds, dels = self._sent[kind], {}, {}
      for n in pairs(set) do if not sent[n] then adds[#adds + 1] = n end end
      for n in pairs(sent) do if not set[n] then dels[#dels + 1] = n end end
      for i = 1, #adds do sent[adds[i]] = true end
      for i = 1, #dels do sent[dels[i]] = nil end
      if #adds > 0 then
        busy = true
        if not send_batches(conn, KINDS[kind], adds) then return false end
      end
      if #dels > 0 then
        busy = true
        if not send_batches(conn, UNDO[kind], dels) then return false end
      end
    end
    if not busy then return true, any end   -- they agree, no send waited since they were compared
    any = true
  end
end

-- Resubscribes everything in one write; `up` once Redis answered a PING sent after them
-- (it answers in order: every subscription is in effect by then) with nothing changed
-- meanwhile (what did goes out, and another PING follows it).
local function resubscribe(self, conn)
  self._sent = { subscribe = {}, psubscribe = {}, ssubscribe = {} }
  if not conn:send("SUBSCRIBE", self._probe) or not reconcile(self, conn) then return false end
  mw.spawn(function()
    while true do
      local pong = mw.timeout(self.probe_timeout + self.backoff_max, conn.call, conn, "PING")
      if not (pong and conn == self._conn) then
        if conn == self._conn then conn:close() end
        return
      end
      local ok, sent = reconcile(self, conn)
      if not ok then return end            -- the connection is failing: the reader sees it
      if not sent then
        if conn == self._conn then set_state(self, "up", { reconnects = self.stats.reconnects }) end
        return
      end
    end
  end)
  return true
end

-- Each message kind and the set (_sets) its name must still be in: the channel's, or for a
-- pmessage the pattern's.
local MSG = { message = "subscribe", smessage = "ssubscribe", pmessage = "psubscribe" }
local SUBSCRIBED = { subscribe = true, psubscribe = true, ssubscribe = true }

local function dispatch(self, v)
  local kind = v[1]
  if not MSG[kind] then
    if SUBSCRIBED[kind] and self.on_subscribed and v[2] ~= self._probe then
      local ok, err = pcall(self.on_subscribed, v[2], kind)
      if not ok then io.stderr:write("moonwire: subscriber on_subscribed: ", tostring(err), "\n") end
    end
    return
  end
  local ch, data, pat = v[2], v[3], nil
  if kind == "pmessage" then pat, ch, data = v[2], v[3], v[4] end
  if ch == self._probe then
    self._probe_due = nil
    return
  end
  -- Redis sends what was published before an UNSUBSCRIBE took effect; for the app an
  -- unsubscribe is immediate (sub:channels() no longer has it), so those are dropped here.
  if not self._sets[MSG[kind]][pat or ch] then return end
  self.stats.messages = self.stats.messages + 1
  local ok, err = pcall(self.on_message, ch, data, pat, kind)
  if not ok then io.stderr:write("moonwire: subscriber on_message: ", tostring(err), "\n") end
end

-- Reads one connection until it fails or a probe goes unanswered.
local function read_loop(self, conn)
  local now = mw.now
  local seen_drops = 0
  while not self.closed do
    local due = self._probe_due
    local wait = due and (due - now()) or self.probe_interval
    if wait <= 0 then
      self.stats.probe_failures = self.stats.probe_failures + 1
      return "probe unanswered"
    end
    local v, err, code = conn:push_recv(wait)
    if v then
      dispatch(self, v)
      local _, _, dropped = conn:pending()
      if dropped ~= seen_drops then
        self.stats.dropped = self.stats.dropped + (dropped - seen_drops)
        seen_drops = dropped
      end
    elseif code == "timeout" then
      if not self._probe_due then
        self.stats.probes = self.stats.probes + 1
        local ok, perr = mw.timeout(self.probe_timeout, conn.call, conn, "PUBLISH", self._probe, "p")
        if not ok then
          self.stats.probe_failures = self.stats.probe_failures + 1
          return "probe failed: " .. tostring(perr)
        end
        self._probe_due = now() + self.probe_timeout
      end
    else
      return err or code
    end
  end
end

local function jitter(d) return d * (0.5 + math.random() * 0.5) end

function M._run(self)
  local delay = self.backoff_min
  local first = true
  while not self.closed do
    -- (a connect that raises, a bad option, is a failed attempt: the task goes on)
    -- (one options table without a url: its host, port... are in copts)
    local done, conn, err = pcall(self._redis.connect, self._target or self._copts, self._target and self._copts or nil)
    if not done then conn, err = nil, conn end
    if self.closed then
      if conn then conn:close() end
      return
    end
    if conn then
      self._conn = conn
      self.stats.connects = self.stats.connects + 1
      if not first then self.stats.reconnects = self.stats.reconnects + 1 end
      first = false
      self._probe_due = nil
      if resubscribe(self, conn) then
        err = read_loop(self, conn)
      end
      self._conn = nil
      conn:close()
      if self.closed then break end
      delay = self.backoff_min
      self.last_error = err
      set_state(self, "down", { error = err })
    else
      self.last_error = err
      -- (the state starts "down": an outage from the start, the first connect failing, was
      -- never reported; it is, once)
      set_state(self, "down", { error = err }, first and not self._told)
      self._told = true
    end
    mw.sleep(jitter(delay))
    delay = math.min(delay * 2, self.backoff_max)
  end
end

--- sub:close(): unsubscribes from everything and ends the reading task.
function Sub:close()
  if self.closed then return end
  self.closed = true
  local conn = self._conn
  self._conn = nil
  if conn then conn:close() end
  if self._task and self._task ~= mw.current() then self._task:cancel() end
  self.state = "closed"
end
Sub.__close = Sub.close

return M
