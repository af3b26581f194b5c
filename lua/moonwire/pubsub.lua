--- moonwire.pubsub: topics, fanned out to local subscribers, to the other workers of this
-- server (the workers bus) and to every server sharing a Redis.
-- A publish is delivered to this process's subscribers at once and sent on with an envelope
-- carrying the origin node id and a per-(node, topic) sequence number; when it comes back from
-- Redis it is recognised by its node id and dropped. So each message reaches each process once,
-- in the order its publisher published it, and local delivery goes on while Redis is down
-- (publish then returns nil, err: the message did not leave this process; or, code
-- "unknown", it was sent and no answer came: it may have been published).
-- Redis channels are per topic, reference-counted, unsubscribed after a delay (join/leave churn
-- costs Redis nothing). History topics are kept in Redis Streams (offset + epoch, one script)
-- and a resubscribed node recovers what it missed, or reports that it cannot. Handlers run in
-- a task per topic fed by a bounded queue; WebSocket members are written with
-- websocket.broadcast (framed once, bounded per-connection queues): the Redis read never waits.
local mw = require "moonwire"
local core = require "moonwire.core"
local bus = require "moonwire.pubsub.bus"

local M = {}

local PS = {}
PS.__index = PS
PS.__name = "moonwire.PubSub"

local now, spawn = mw.now, mw.spawn

-- A recovery reads the stream a page at a time, each read under `timeout`: a backlog of any
-- length is read (in one XRANGE, one past what `timeout` allows failed every time, retried
-- for good while the topic's live messages piled up).
local PAGE = 1000
-- Live messages held while a recovery runs, at most: past that they are let go, and read
-- from the stream once the recovery reached its end (every one of them is in it).
local PENDING_MAX = 10000
local is_error

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

-- Topics travel the workers bus with a 2-byte length (">s2"): a longer one could be
-- subscribed but never published, so every method refuses it.
local MAX_TOPIC = 65535

local function checktopic(n, fname, topic)
  if type(topic) ~= "string" then
    error(("bad argument #%d to '%s' (string expected, got %s)"):format(n, fname, type(topic)), 3)
  end
  if #topic > MAX_TOPIC then
    error(("bad argument #%d to '%s' (topic longer than %d bytes)"):format(n, fname, MAX_TOPIC), 3)
  end
end

local function checkws(n, fname, ws)
  local mt = getmetatable(ws)
  if type(mt) ~= "table" or mt.__name ~= "moonwire.WebSocket" then
    error(("bad argument #%d to '%s' (WebSocket expected, got %s)"):format(n, fname,
      type(mt) == "table" and type(mt.__name) == "string" and mt.__name or type(ws)), 3)
  end
end

-- An option checked when the instance is made, not where it is first used (a string queue
-- used to fail at the first publish; a string unsubscribe_delay killed the sweeper task, and
-- idle topics were never forgotten afterwards).
local function optcheck(opts, k, ok, expected, default)
  local v = opts[k]
  if v == nil then return default end
  if not ok(v) then
    -- (a number of the wrong range is shown: "got 0" says more than "got number")
    local numeric = type(v) == "number" and (expected:find("number") or expected:find("integer"))
    error(("bad option '%s' (%s expected, got %s)"):format(k, expected, numeric and tostring(v) or type(v)), 3)
  end
  return v
end

local function posint(v) return math.type(v) == "integer" and v > 0 end
local function posnum(v) return type(v) == "number" and v > 0 end
local function nonneg(v) return type(v) == "number" and v >= 0 end
local function isstring(v) return type(v) == "string" end
local function isfunction(v) return type(v) == "function" end
local function iskind(v) return v == "text" or v == "binary" end

local function hex(n)
  return (core.random(n):gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- The history publish (after Centrifugo): offset and epoch in a hash, the envelope in a stream
-- whose entry id is 0-<offset>, then PUBLISH with the offset and epoch in the envelope.
-- KEYS: meta hash, stream, channel. ARGV: envelope head ("node seq"), data, maxlen, ttl.
local PUBLISH_HISTORY = [[
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. t[2]
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local off = redis.call('HINCRBY', KEYS[1], 'o', 1)
local env = ARGV[1] .. ' ' .. off .. ' ' .. epoch .. '\n' .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '0-' .. off, 'e', env)
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', KEYS[3], env)
return off
]]

local function parse_env(env)
  local node, seq, off, epoch, pos = env:match("^(%S+) (%d+) (%d+) (%S+)\n()")
  if not node then return nil end
  return node, tonumber(seq), tonumber(off), epoch, env:sub(pos)
end

--- pubsub.new(opts) -> ps (inside a task)
-- opts: redis (URL or connect options table; nil: this process and its sibling workers only),
-- node (id, default random), prefix ("mw:"), history (number: entries kept for every topic,
-- or function(topic) -> number | nil), history_ttl (s, 0: none), queue (1024, per-topic
-- handler queue), unsubscribe_delay (1 s), backoff_min/backoff_max/probe_interval/probe_timeout
-- (the subscriber's), timeout (per publish, 2 s), on_event(event, topic, info),
-- kind ("text" | "binary": WebSocket members' frames), bus (false: not the workers bus).
-- (dry: only the checks, for pubsub.configure; then nothing is made)
local function new(opts, dry)
  opts = opts or {}
  if type(opts) ~= "table" then argerror(1, dry and "configure" or "new", "table expected, got " .. type(opts)) end
  if not dry and not mw.current() then error("pubsub.new: called outside a task", 2) end
  local hist = opts.history
  if hist ~= nil and type(hist) ~= "number" and type(hist) ~= "function" then
    error("bad option 'history' (number or function expected)", 2)
  end
  -- (the stream's MAXLEN: -1 or 1.5 made every publish of every topic fail with Redis's error)
  if type(hist) == "number" and not posint(hist) then
    error(("bad option 'history' (positive integer expected, got %s)"):format(tostring(hist)), 2)
  end
  local self = setmetatable({
    node = optcheck(opts, "node", isstring, "string") or hex(6),
    prefix = optcheck(opts, "prefix", isstring, "string", "mw:"),
    _history = type(hist) == "number" and function() return hist end or hist,
    history_ttl = optcheck(opts, "history_ttl", nonneg, "non-negative number", 0),
    queue = optcheck(opts, "queue", posint, "positive integer", 1024),
    unsubscribe_delay = optcheck(opts, "unsubscribe_delay", nonneg, "non-negative number", 1),
    timeout = optcheck(opts, "timeout", posnum, "positive number", 2),
    kind = optcheck(opts, "kind", iskind, "\"text\" or \"binary\"", "text"),
    on_event = optcheck(opts, "on_event", isfunction, "function") or function() end,
    _topics = {}, _seq = {}, _idle = {}, _nidle = 0, _busy = {},
    stats = { published = 0, delivered = 0, dropped = 0, duplicates = 0, lost = 0, recovered = 0,
      publish_errors = 0 },
    state = "local",
  }, PS)
  if opts.redis then
    local redis = require "moonwire.redis"
    -- (a bad URL is this option's error, not one of redis.subscriber's arguments)
    if type(opts.redis) ~= "string" and type(opts.redis) ~= "table" then
      error("bad option 'redis' (URL or table expected, got " .. type(opts.redis) .. ")", 2)
    end
    local url = type(opts.redis) == "string" and opts.redis or opts.redis.url
    if url ~= nil and type(url) ~= "string" then
      error("bad option 'redis' (its url: string expected, got " .. type(url) .. ")", 2)
    end
    if url ~= nil then
      local ok, err = redis.parse_url(url)
      if not ok then error("bad option 'redis' (" .. tostring(err) .. ")", 2) end
    end
    if dry then        -- (what redis.subscriber checks, below: its own checks)
      require("moonwire.redis.subscriber").check(opts.redis, { backoff_min = opts.backoff_min,
        backoff_max = opts.backoff_max, probe_interval = opts.probe_interval, probe_timeout = opts.probe_timeout,
        connect_timeout = opts.connect_timeout }, "configure")
      return
    end
    is_error = redis.is_error
    self._redis, self._redis_url = redis, opts.redis
    self.backoff_min, self.backoff_max = opts.backoff_min or 0.1, opts.backoff_max or 5
    self.state = "down"
    self._script = redis.script(PUBLISH_HISTORY)
    self._sub = redis.subscriber(opts.redis, {
      backoff_min = opts.backoff_min, backoff_max = opts.backoff_max,
      probe_interval = opts.probe_interval, probe_timeout = opts.probe_timeout,
      connect_timeout = opts.connect_timeout,
      on_message = function(ch, data) self:_incoming(ch:sub(#self.prefix + 1), data) end,
      on_state = function(state, info) self:_sub_state(state, info) end,
      on_subscribed = function(ch) self:_subscribed(ch) end,
    })
  elseif dry then
    return
  elseif opts.bus ~= false and bus.available() then
    self._bus = true
    self._bus_leave = assert(bus.join(function(body)
      local topic, env = string.unpack(">s2s4", body)
      self:_incoming(topic, env)
    end))
  end
  return self
end
function M.new(opts) return new(opts) end

-- ---- topics ------------------------------------------------------------------------------

local baseline

local function topic_of(self, topic)
  local t = self._topics[topic]
  if t then
    if t.idle then
      t.idle = nil
      self._idle[topic] = nil
    end
    return t
  end
  t = { name = topic, refs = 0, members = {}, midx = {}, handlers = {}, last = {}, drops = 0 }
  self._topics[topic] = t
  if self._sub then
    if self._history and self._history(topic) then
      t.history = true
      spawn(baseline, self, t)          -- which subscribes
    else
      self._sub:subscribe(self.prefix .. topic)
    end
  end
  return t
end

-- The sweeper: topics nobody used for unsubscribe_delay are forgotten, their Redis channels
-- unsubscribed in one batch.
local function sweep(self)
  while self._nidle > 0 do
    mw.sleep(self.unsubscribe_delay)
    local cut, gone = now() - self.unsubscribe_delay, {}
    for name, since in pairs(self._idle) do
      if since <= cut then
        self._idle[name] = nil
        self._topics[name] = nil
        gone[#gone + 1] = self.prefix .. name
      end
    end
    self._nidle = 0
    for _ in pairs(self._idle) do self._nidle = self._nidle + 1 end
    if self._sub and #gone > 0 then self._sub:unsubscribe(table.unpack(gone)) end
  end
  self._sweeper = nil
end

local function unref(self, t)
  t.refs = t.refs - 1
  if t.refs > 0 then return end
  t.idle = true
  self._idle[t.name] = now()
  self._nidle = self._nidle + 1
  if not self._sweeper and not self.closed then self._sweeper = spawn(sweep, self) end
end

-- Handlers run in the topic's task, which lives while its queue is not empty.
local function drain(t)
  local q = t.q
  while q.first <= q.last do
    local n = q.first
    local data = q[n]
    q[n] = nil
    q.first = n + 1
    -- (ps:unsubscribe replaces t.handlers rather than editing it: a handler closed by one
    -- of these calls leaves this loop's list whole, and is skipped by its mark)
    local hs = t.handlers
    for i = 1, #hs do
      local h = hs[i]
      -- (a handler gets what was published once it was there: h.from, set by subscribe)
      if not h.closed and n >= h.from then
        local ok, err = pcall(h.fn, data, t.name)
        if not ok then io.stderr:write("moonwire: pubsub handler: ", tostring(err), "\n") end
      end
    end
  end
  t.task = nil
end

local ws_broadcast

local function deliver(self, t, data)
  if t.members[1] then
    ws_broadcast = ws_broadcast or require("moonwire.websocket").broadcast
    local ok, n = pcall(ws_broadcast, t.members, data, self.kind)
    if ok then
      self.stats.delivered = self.stats.delivered + n
    else
      -- kind "text" and data that is not UTF-8 (raised before any member got a byte): the
      -- members would all have to close with 1007 (RFC 6455 §8.1); none gets it, counted
      t.drops = t.drops + 1
      self.stats.dropped = self.stats.dropped + 1
    end
  end
  if t.handlers[1] then
    local q = t.q
    if not q then q = { first = 1, last = 0 } t.q = q end
    if q.last - q.first + 1 >= self.queue then
      t.drops = t.drops + 1
      self.stats.dropped = self.stats.dropped + 1
      return
    end
    q.last = q.last + 1
    q[q.last] = data
    self.stats.delivered = self.stats.delivered + 1
    if not t.task then t.task = spawn(drain, t) end
  end
end

local function event(self, name, topic, info)
  local ok, err = pcall(self.on_event, name, topic, info)
  if not ok then io.stderr:write("moonwire: pubsub on_event: ", tostring(err), "\n") end
end

-- ---- incoming (Redis or the workers bus) -------------------------------------------------

local recover

-- A message this process had from its publisher on the topic (history: the envelope's node and
-- sequence number; a node's numbers only grow), and the record of one it has now.
local function had(t, node, seq)
  local last = t.last[node]
  return last ~= nil and seq <= last
end

local function note(t, node, seq)
  local last = t.last[node]
  if not last or seq > last then t.last[node] = seq end
end

-- A history topic's stream went back (Redis restarted from an older snapshot, a failover to a
-- replica that was behind, the keys restored): what was published past the point it went back
-- to and not had here is gone, and new messages take offsets this process already passed (it
-- dropped them as duplicates, silently). Reported; then the stream is read from its start and
-- up to the old offset only what this process never had is delivered (t.redo).
local function rolled_back(self, t)
  self.stats.lost = self.stats.lost + 1
  event(self, "lost", t.name, { reason = "rollback", offset = t.off })
  t.redo = math.max(t.redo or 0, t.off)
  t.off, t.had_off = 0, nil
end

function PS:_incoming(topic, env)
  if self.closed then return end
  local t = self._topics[topic]
  if not t then return end
  local node, seq, off, epoch, data = parse_env(env)
  if not node then return end
  if t.history and off > 0 then
    if t.recovering then
      local p = t.pending
      if #p < PENDING_MAX then p[#p + 1] = env else t.again = true end
      return
    end
    if t.epoch and t.epoch ~= "" and t.epoch ~= epoch then
      -- the stream was started again (Redis restarted empty): what came before is gone; the
      -- new stream is followed from its start (a gap before this message is recovered)
      self.stats.lost = self.stats.lost + 1
      event(self, "lost", topic, { reason = "epoch", epoch = epoch, was = t.epoch })
      t.off, t.had_off = 0, nil
    end
    t.epoch = epoch
    if t.off and off <= t.off then
      -- (an offset from the baseline read was no message's: a message at or below it is from
      -- before, come through a subscription not yet undone when the topic was forgotten)
      if had(t, node, seq) or not t.had_off then
        self.stats.duplicates = self.stats.duplicates + 1
        return
      end
      -- a live message held while a recovery read the stream, and not in what it read: it
      -- was trimmed away before the read (counted lost there) or lies below what the read
      -- delivered; no rollback (the read judged the stream), and its place is passed
      if t.replaying then return end
      -- at or below the offset, and new: the stream went back (this is past it)
      rolled_back(self, t)
      t.pending = { env }
      return recover(self, t)
    end
    if t.off and off > t.off + 1 then
      t.pending = { env }
      return recover(self, t)
    end
    t.off, t.had_off = off, true
    note(t, node, seq)
    if node == self.node then return end        -- our own, delivered when published
    return deliver(self, t, data)
  end
  if node == self.node then return end          -- our own, delivered when published
  local last = t.last[node]
  if last and seq > last + 1 and not t.history then
    local n = seq - last - 1
    t.drops = t.drops + n
    self.stats.lost = self.stats.lost + n
    event(self, "drop", topic, { count = n, node = node })
  end
  t.last[node] = seq
  deliver(self, t, data)
end

-- Reads a history topic's place in Redis: its epoch ("" while the stream has none) and its
-- last offset, and with `after` the stream's entries past that offset (from it: `inclusive`).
-- -> epoch, top, entries | nil (no connection, a timeout, an error reply: try again later)
local function read_stream(self, t, after, inclusive)
  local conn = self:_conn()
  if not conn then return nil end
  local meta, stream = self:_keys(t.name)
  local res = self:_call(conn, function(c)
    return mw.timeout(self.timeout, c.pipeline, c, function(p)
      p:hmget(meta, "e", "o")
      if after then
        p:xrange(stream, after > 0 and (inclusive and "0-" or "(0-") .. after or "-", "+", "COUNT", PAGE)
      end
    end)
  end)
  if self.closed then return nil end
  if not res or is_error(res[1]) or (after and type(res[2]) ~= "table") or is_error(res[2]) then
    return nil
  end
  local epoch = res[1][1]
  return type(epoch) == "string" and epoch or "", tonumber(res[1][2]) or 0, res[2]
end

-- Calls fn(self, t) until it returns true, waiting a backoff after each false; gives up
-- (false) once the instance is closed or the topic forgotten.
local function retry(self, t, fn)
  local delay = self.backoff_min
  while true do
    if self.closed or self._topics[t.name] ~= t then return false end
    if fn(self, t) then return not self.closed and self._topics[t.name] == t end
    mw.sleep(delay)
    delay = math.min(delay * 2, self.backoff_max)
  end
end

-- A history topic is subscribed once its stream's place (epoch, offset) is known: what is
-- published after that read is this process's, live or recovered from the stream (after a
-- gap, or at the next "up" if the subscription is cut before any message came). Read after
-- subscribing, an outage in between would put what it missed before the offset: a silent gap.
function baseline(self, t)
  local ok = retry(self, t, function()
    local epoch, top = read_stream(self, t)
    if not epoch then return false end
    t.epoch, t.off = epoch, top
    return true
  end)
  if ok then self._sub:subscribe(self.prefix .. t.name) end
end

local function entry_off(e)
  return tonumber(e[1]:match("%-(%d+)$"))
end

-- Whether the stream's entry at the topic's offset (read with it) is still the message this
-- process had there. One that cannot be checked (none there: trimmed; an offset that was
-- not a message's: baseline) counts as still.
local function still_had(t, entries)
  local e = entries[1]
  if not t.had_off or not e or entry_off(e) ~= t.off then return true end
  local node, seq = parse_env(e[2][2])
  return node ~= nil and had(t, node, seq)
end

-- One recovery read: true when done, false when it must be tried again.
local function recover_once(self, t)
  local epoch, top, entries = read_stream(self, t, t.off, t.had_off)
  if not epoch then return false end
  if t.epoch and t.epoch ~= "" and epoch ~= t.epoch then
    -- the stream started again (Redis restarted empty, the keys expired): what this process
    -- missed of the old one is gone; the new one is read from its start (the read above began
    -- at the old offset). Said once: a failed read from here is tried from the new stream.
    self.stats.lost = self.stats.lost + 1
    event(self, "lost", t.name, { reason = "epoch", epoch = epoch, was = t.epoch })
    t.epoch, t.off, t.had_off = epoch, 0, nil
    epoch, top, entries = read_stream(self, t, 0)
    if not epoch then return false end
    if epoch ~= t.epoch then return false end      -- (started again meanwhile: once more)
  elseif t.off and (top < t.off or not still_had(t, entries)) then
    -- the same stream, behind this process's offset or with another message at it: it went
    -- back (Redis restarted from an older snapshot, and maybe got as far again since). Read
    -- from its start (what was had is skipped); said once, as above.
    rolled_back(self, t)
    epoch, top, entries = read_stream(self, t, 0)
    if not epoch then return false end
    if epoch ~= t.epoch then return false end
  end
  local e1 = entries[1]
  if e1 and entry_off(e1) <= (t.off or 0) then e1 = entries[2] end   -- (the one at t.off)
  local first = e1 and entry_off(e1)
  -- (after a rollback what lies below the old offset is not counted: reported already)
  local from = math.max(t.off or 0, t.redo or 0) + 1
  if (first and first > from) or (not first and top >= from) then
    local n = (first or top + 1) - from
    self.stats.lost = self.stats.lost + n
    event(self, "lost", t.name, { reason = "trimmed", count = n })
  end
  t.epoch = epoch
  local n = 0
  while true do
    for _, e in ipairs(entries) do
      local fields = e[2]
      local env = fields[2]
      local node, seq, off, _, data = parse_env(env)
      if node and off > (t.off or 0) then
        t.off, t.had_off = off, true
        local redone = t.redo and off <= t.redo and had(t, node, seq)
        note(t, node, seq)
        if node ~= self.node and not redone then
          n = n + 1
          deliver(self, t, data)
        end
      end
    end
    if #entries < PAGE then break end                -- the stream's end
    local page_epoch, _, more = read_stream(self, t, t.off)
    epoch, entries = page_epoch, more
    if not epoch or epoch ~= t.epoch then
      -- (tried again from t.off: what was delivered stays delivered)
      self.stats.recovered = self.stats.recovered + n
      t.recovered_n = (t.recovered_n or 0) + n
      return false
    end
  end
  self.stats.recovered = self.stats.recovered + n
  n = n + (t.recovered_n or 0)
  t.recovered_n, t.redo = nil, nil
  if n > 0 or t.loud then event(self, "recovered", t.name, { count = n, offset = t.off }) end
  return true
end

-- Recovers a history topic from its stream after a gap or a reconnect: live messages for the
-- topic wait in t.pending meanwhile, then follow (without duplicates). Reports "recovered"
-- (count) or "lost" (epoch, rollback, trimmed). A read that fails is tried again after a
-- backoff: given up, it would leave the topic short (and drop what waited), silently, until
-- its next message.
-- quiet: a check (a subscription confirmed), reported only when it found something.
function recover(self, t, quiet)
  if not quiet then t.loud = true end
  if t.recovering then
    t.again = true         -- (an outage during the read: what it missed is read next)
    return
  end
  t.recovering = true
  t.pending = t.pending or {}
  spawn(function()
    local ok = retry(self, t, function()
      repeat
        t.again = nil
        if not recover_once(self, t) then return false end
      until not t.again
      return true
    end)
    local pending = t.pending
    t.recovering, t.pending, t.loud = nil, nil, nil
    if not ok then return end
    t.replaying = true
    for _, env in ipairs(pending) do self:_incoming(t.name, env) end
    t.replaying = nil
  end)
end

function PS:_keys(topic)
  local base = self.prefix .. "{" .. topic .. "}"
  return base .. ":meta", base .. ":stream", self.prefix .. topic
end

-- The server confirmed a subscription: from now on the topic's messages come live. For a
-- history topic, what was published between the read of its place (baseline) or the last
-- recovery and this moment is only in the stream: read it (a quiet topic would otherwise
-- miss it until its next message showed the gap).
-- After a reconnect that read is the recovery of what the outage missed ("recovered" is
-- reported, with its count); after the first subscribe only if it found something.
function PS:_subscribed(ch)
  if self.closed then return end
  local t = self._topics[ch:sub(#self.prefix + 1)]
  if t and t.history and t.off then
    recover(self, t, not t.confirmed)
    t.confirmed = true
  end
end

-- (the publishing connection is left alone: its own calls tell whether it works. Closed
-- here, it failed publishes Redis had already taken, which then returned nil, "closed")
function PS:_sub_state(state, info)
  self.state = state
  event(self, state, nil, info)
  -- (history topics recover once their subscription is confirmed again: _subscribed)
end

-- The publishing connection: connected on demand (by one task; the others wait for it), not
-- retried before the backoff ran out.
function PS:_conn()
  if self.closed then return nil, "pubsub closed", "closed" end
  local c = self._pub
  if c and c:alive() then return c end
  if self._pub_retry and now() < self._pub_retry then
    return nil, self._pub_err or "Redis unavailable", "unavailable"
  end
  local connecting = self._connecting
  if connecting then
    -- another task connects: wait until it closes the channel (a timeout leaves it)
    connecting:recv(self.timeout + 1)
    if self._pub then return self._pub end
    return nil, self._pub_err or "Redis unavailable", "unavailable"
  end
  connecting = mw.channel()
  self._connecting = connecting
  -- (a connect that raises, a bad option, must not leave the instance connecting for good)
  local done, err, code
  done, c, err, code = pcall(self._redis.connect, self._redis_url, { connect_timeout = self.timeout })
  self._connecting = nil
  connecting:close()
  if not done then error(c, 0) end
  if not c then
    self._pub, self._pub_err = nil, "Redis unavailable: " .. tostring(err)
    self._pub_retry = now() + self.backoff_min
    return nil, self._pub_err, code or "unavailable"
  end
  if self.closed then          -- closed while it connected: the new connection is nobody's
    c:close()
    return nil, "pubsub closed", "closed"
  end
  c:settimeout(self.timeout)
  self._pub, self._pub_retry = c, nil
  return c
end

-- fn(conn) -> v, err, code: a call on a publishing connection. Its fate depends on its own
-- I/O only: one that failed is replaced by _conn; one whose call timed out (a server that
-- stopped answering, a silent failover) is retired: the next call connects anew, the calls
-- still on it end as they will (each under its timeout), and the last one closes it.
function PS:_call(conn, fn)
  local busy = self._busy
  busy[conn] = (busy[conn] or 0) + 1
  local done, v, err, code = pcall(fn, conn)
  local n = busy[conn] - 1
  busy[conn] = n > 0 and n or nil
  if done and v == nil and code == "timeout" and self._pub == conn then self._pub = nil end
  if n == 0 and self._pub ~= conn then conn:close() end
  if not done then error(v, 0) end
  return v, err, code
end

-- ---- the API -----------------------------------------------------------------------------

--- ps:publish(topic, data) -> true | nil, err, code
-- Delivered to this process's subscribers at once; then to the other workers (bus) or to
-- Redis. nil, err, code: it did not leave this process (Redis down, an error reply, a full
-- bus queue); but code "unknown": it was sent to Redis and its answer did not come (a
-- timeout, the connection lost): Redis may have published it, a retry may duplicate it.
function PS:publish(topic, data)
  checktopic(1, "publish", topic)
  if type(data) ~= "string" then argerror(2, "publish", "string expected, got " .. type(data)) end
  if self.closed then error("pubsub: publish after close", 2) end
  local seq = (self._seq[topic] or 0) + 1
  self._seq[topic] = seq
  self.stats.published = self.stats.published + 1
  local t = self._topics[topic]
  if t then deliver(self, t, data) end
  local ok, err, code = true, nil, nil
  if self._redis then
    local conn
    conn, err, code = self:_conn()
    if conn then
      local size = self._history and self._history(topic)
      local send
      if size then
        local meta, stream, ch = self:_keys(topic)
        send = function(c)
          return self._script:run(c, { meta, stream, ch }, { self.node .. " " .. seq, data, size, self.history_ttl })
        end
      else
        send = function(c) return c:publish(self.prefix .. topic, self.node .. " " .. seq .. " 0 -\n" .. data) end
      end
      ok, err, code = self:_call(conn, send)
      if not ok and code ~= "redis" then
        -- (conn was alive: the command went into its output buffer; how far it got is unknown)
        err, code = "outcome unknown (" .. tostring(err) .. "): Redis may have published it", "unknown"
      end
    else
      ok = nil
    end
  elseif self._bus then
    ok, err, code = bus.send(string.pack(">s2s4", topic, self.node .. " " .. seq .. " 0 -\n" .. data))
  end
  if not ok then
    self.stats.publish_errors = self.stats.publish_errors + 1
    return nil, err, code
  end
  return true
end

local Handle = {}
Handle.__index = Handle
function Handle:close() self.ps:unsubscribe(self) end
Handle.__close = Handle.close

--- ps:subscribe(topic, fn) -> handle: fn(data, topic) gets the topic's messages published from
-- then on, in a task of the topic (it may block; a full queue drops and counts). handle:close()
-- ends it. (All of them but, on a topic without history over Redis, another process's in the
-- moment before the topic's SUBSCRIBE, sent without waiting, is in effect: see docs/pubsub.md.)
function PS:subscribe(topic, fn)
  checktopic(1, "subscribe", topic)
  if type(fn) ~= "function" then argerror(2, "subscribe", "function expected, got " .. type(fn)) end
  if self.closed then error("pubsub: subscribe after close", 2) end
  local t = topic_of(self, topic)
  -- the first message of the topic's queue this handler gets: none queued before it came
  local h = setmetatable({ ps = self, topic = topic, fn = fn, from = (t.q and t.q.last or 0) + 1 }, Handle)
  t.handlers[#t.handlers + 1] = h
  t.refs = t.refs + 1
  return h
end

--- ps:unsubscribe(handle)
function PS:unsubscribe(h)
  if getmetatable(h) ~= Handle then
    argerror(1, "unsubscribe", "subscription handle expected, got " .. type(h))
  end
  local t = self._topics[h.topic]
  if not t or h.ps ~= self then return end
  local hs = t.handlers
  for i, x in ipairs(hs) do
    if x == h then
      -- a new list, not table.remove: drain may be looping over this one (a handler that
      -- closes itself, or another task closing it while it waits)
      h.closed = true
      local rest = table.move(hs, 1, i - 1, 1, {})
      t.handlers = table.move(hs, i + 1, #hs, i, rest)
      unref(self, t)
      return
    end
  end
end

--- ps:join(ws, topic): the WebSocket connection gets the topic's messages, as a subscriber does
-- (see ws:join).
function PS:join(ws, topic)
  checkws(1, "join", ws)
  checktopic(2, "join", topic)
  if self.closed then error("pubsub: join after close", 2) end
  if ws.state ~= "open" then return nil, "closed", "closed" end
  local joined = ws._topics
  if not joined then joined = {} ws._topics = joined end
  if joined[topic] then return true end
  joined[topic] = self
  local t = topic_of(self, topic)
  local n = #t.members + 1
  t.members[n] = ws
  t.midx[ws] = n
  t.refs = t.refs + 1
  return true
end

--- ps:leave(ws, topic)
function PS:leave(ws, topic)
  checkws(1, "leave", ws)
  checktopic(2, "leave", topic)
  local joined = ws._topics
  if not joined or joined[topic] ~= self then return false end
  joined[topic] = nil
  local t = self._topics[topic]
  local i = t and t.midx[ws]
  if not i then return false end
  local m = t.members
  local n = #m
  m[i], m[n] = m[n], nil
  if i < n then t.midx[m[i]] = i end
  t.midx[ws] = nil
  unref(self, t)
  return true
end

--- ps:members(topic) -> number of local WebSocket members
function PS:members(topic)
  checktopic(1, "members", topic)
  local t = self._topics[topic]
  return t and #t.members or 0
end

--- ps:topic_stats(topic) -> { refs, members, drops, offset, epoch } | nil
function PS:topic_stats(topic)
  checktopic(1, "topic_stats", topic)
  local t = self._topics[topic]
  if not t then return nil end
  return { refs = t.refs, members = #t.members, drops = t.drops, offset = t.off, epoch = t.epoch }
end

--- ps:subscriber() -> the Redis subscriber (nil without Redis)
function PS:subscriber() return self._sub end

--- ps:close(): delivers nothing more (subscribe and join raise; unsubscribe and leave still
-- work) and leaves Redis or the workers bus.
function PS:close()
  if self.closed then return end
  self.closed = true
  if self._bus_leave then self._bus_leave() end
  if self._sub then self._sub:close() end
  -- (publishes still on it end as they will: the last one closes it)
  local pub = self._pub
  self._pub = nil
  if pub and not self._busy[pub] then pub:close() end
  if self._sweeper and self._sweeper ~= mw.current() then self._sweeper:cancel() end
end

-- ---- the process's default instance ------------------------------------------------------

local default_opts, default_ps, default_pid

--- pubsub.configure(opts): the options of pubsub.default() (call before the workers fork).
function M.configure(opts)
  if type(opts) ~= "table" then argerror(1, "configure", "table expected, got " .. type(opts)) end
  -- a bad option raises here, not in each handler that uses pubsub.default()
  new(opts, true)
  default_opts = opts
  if default_ps and default_pid == core.getpid() then default_ps:close() end
  default_ps = nil
end

--- pubsub.close_default(): closes this process's default instance, if it made one. The HTTP
-- server's graceful shutdown (http.serve, and each worker) calls it, so a process whose
-- WebSockets joined topics exits on SIGTERM instead of keeping its subscriber alive.
function M.close_default()
  if default_ps and default_pid == core.getpid() then default_ps:close() end
  default_ps = nil
end

--- pubsub.default() -> this process's instance (made on first use, after a fork anew).
function M.default()
  local pid = core.getpid()
  if not default_ps or default_pid ~= pid then
    default_ps = M.new(default_opts or {})
    default_pid = pid
  end
  return default_ps
end

return M
