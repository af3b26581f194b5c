--- What the coordinator and the agents of a distributed `moonwire bench` share: the Redis
-- key names (docs/bench.md, "Distributed runs"), a Redis link that never raises and
-- reconnects on its own, the clock offset against Redis `TIME`, and the split of a test
-- over agents.
local mw = require "moonwire"
local core = require "moonwire.core"
local redis = require "moonwire.redis"

local hrtime = core.hrtime

local M = {}

M.PREFIX = "mwbench:"
M.HEARTBEAT = 0.5      -- seconds between heartbeats (agents and coordinator)
M.TTL = 2              -- a heartbeat key lives this long: missing for longer = gone
M.BARRIER = 15         -- seconds the coordinator waits for every agent to be ready
M.GO_WAIT = M.BARRIER + 5   -- seconds a ready agent waits for the start signal (BLPOP)
-- the client timeout of links that block (BLPOP, XREAD BLOCK): longer than the longest block,
-- or the client gives up on a wait Redis still honours (and the agent drops its job)
M.BLOCK_TIMEOUT = M.GO_WAIT + 10

--- Key names: dist.key("agent", name) -> "mwbench:agent:NAME".
function M.key(...)
  return M.PREFIX .. table.concat({ ... }, ":")
end

-- ---------------------------------------------------------------------------------------
-- a Redis link: connects lazily, reconnects after a failure (at most 5 times a second),
-- returns nil, err, code instead of raising; `up_since` is when the current connection
-- was made (a peer judged by heartbeats gets a grace period after a reconnection)

local Link = {}
Link.__index = Link

function M.link(url, timeout)
  return setmetatable({ url = url, timeout = timeout or 5, next_try = 0, up_since = nil }, Link)
end

function Link:conn()
  local c = self.c
  if c and c:alive() then return c end
  if c then c:close() self.c = nil self.up_since = nil end
  if mw.now() < self.next_try then return nil, self.err or "not connected", "closed" end
  local err, code
  c, err, code = redis.connect(self.url, { connect_timeout = 1, timeout = self.timeout })
  if not c then
    self.next_try, self.err = mw.now() + 0.2, err
    return nil, err, code
  end
  self.c, self.up_since = c, mw.now()
  return c
end

--- link:call(cmd, ...) -> reply | nil, err, code (never raises for a lost connection)
function Link:call(cmd, ...)
  local c, err, code = self:conn()
  if not c then return nil, err, code end
  local v
  v, err, code = c:call(cmd, ...)
  if v == nil and code ~= "redis" and not c:alive() then self.c = nil self.up_since = nil c:close() end
  return v, err, code
end

function Link:close()
  if self.c then self.c:close() self.c = nil end
end

M.null = redis.null

--- Whether a heartbeat key found missing on `link` means its owner is gone: the key expired
-- (TTL), unless the connection is younger than a TTL (Redis restarted and lost it; the
-- owner puts it back within a heartbeat).
function M.gone(link)
  return link.up_since ~= nil and mw.now() - link.up_since > M.TTL
end

--- Redis time in microseconds (from TIME), or nil, err.
function M.redis_time(link)
  local t, err = link:call("TIME")
  if not t then return nil, err end
  return math.tointeger(tonumber(t[1])) * 1000000 + math.tointeger(tonumber(t[2]))
end

--- Offset of Redis's clock against this process's monotonic clock, from the fastest of
-- `n` round trips of TIME: redis_us ~= hrtime_us + offset_us. -> offset_us, rtt_us | nil, err
function M.clock_offset(link, n)
  local best, offset, err
  for _ = 1, n or 7 do
    local t0 = hrtime()
    local r
    r, err = M.redis_time(link)
    local t1 = hrtime()
    if r then
      local rtt = (t1 - t0) // 1000
      if not best or rtt < best then
        best, offset = rtt, r - (t0 + t1) // 2000
      end
    end
  end
  if not offset then return nil, err end
  return offset, best
end

-- ---------------------------------------------------------------------------------------
-- the split

--- Splits `total` threads over agents in proportion to their capacity (each gets at least
-- one; largest remainders get the rest). caps: { n1, n2, ... } -> { t1, t2, ... }
function M.split_threads(total, caps)
  local n = #caps
  assert(total >= n, "fewer threads than agents")
  local sum = 0
  for _, c in ipairs(caps) do sum = sum + c end
  local out, rem, used = {}, {}, 0
  for i, c in ipairs(caps) do
    local exact = (total - n) * c / sum
    out[i] = 1 + math.floor(exact)
    rem[i] = { i = i, r = exact - math.floor(exact) }
    used = used + out[i]
  end
  table.sort(rem, function(a, b) if a.r ~= b.r then return a.r > b.r end return a.i < b.i end)
  for k = 1, total - used do out[rem[k].i] = out[rem[k].i] + 1 end
  return out
end

--- Global thread g of T gets connections as one process with T threads would give them.
function M.conns_of(g, T, connections)
  return connections // T + (g <= connections % T and 1 or 0)
end

return M
