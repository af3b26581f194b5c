--- The API of scenario files: metrics (trends, counters, checks), a timed HTTP client, time
-- and think time. A scenario file returns { stages | users + duration, user, setup,
-- thresholds }; `moonwire bench --scenario FILE` runs it (see docs/bench.md).
local mw = require "moonwire"
local core = require "moonwire.core"

local M = {}

local hrtime = core.hrtime

-- the metrics of this Lua state (each bench thread has its own; the main state merges)
local registry = { trends = {}, counters = {}, checks = {}, order = {} }
local client, source

--- Called by the scenario runner before the users start: `source`, the local address the
-- HTTP client binds (an agent's --source); `per_second`, whether each trend also keeps the
-- current second's histogram (`sec`, for a distributed run's interval snapshots).
function M._reset(opts)
  opts = opts or {}
  registry = { trends = {}, counters = {}, checks = {}, order = {}, per_second = opts.per_second }
  client, source = nil, opts.source
end

function M._registry() return registry end

local Trend = {}
Trend.__index = Trend

--- A trend: numbers (milliseconds by convention) summarized as avg/min/med/max/p90/p95/p99.
function M.trend(name)
  if type(name) ~= "string" then error("bad argument #1 to 'trend' (string expected)", 2) end
  local t = registry.trends[name]
  if not t then
    t = setmetatable({ name = name, h = core.histogram(), sec = registry.per_second and core.histogram() or nil },
      Trend)
    registry.trends[name] = t
    registry.order[#registry.order + 1] = name
  end
  return t
end

--- Records a value (kept with 1/1000 resolution).
function Trend:add(v)
  if type(v) ~= "number" then error("bad argument #1 to 'add' (number expected)", 2) end
  if v < 0 then v = 0 end
  v = math.floor(v * 1000 + 0.5)
  self.h:record(v)
  if self.sec then self.sec:record(v) end
end

local Counter = {}
Counter.__index = Counter

function M.counter(name)
  if type(name) ~= "string" then error("bad argument #1 to 'counter' (string expected)", 2) end
  local c = registry.counters[name]
  if not c then
    c = setmetatable({ name = name, value = 0 }, Counter)
    registry.counters[name] = c
    registry.order[#registry.order + 1] = name
  end
  return c
end

function Counter:add(n)
  self.value = self.value + (n or 1)
end

--- Counts a named check as passed or failed; returns ok.
function M.check(name, ok)
  local c = registry.checks[name]
  if not c then
    c = { pass = 0, fail = 0 }
    registry.checks[name] = c
  end
  if ok then c.pass = c.pass + 1 else c.fail = c.fail + 1 end
  return ok
end

--- Seconds, as a float, with sub-microsecond resolution (not the loop's cached clock).
function M.now() return hrtime() / 1e9 end

M.sleep = mw.sleep

-- The HTTP client with timing: http_req_duration (ms), http_reqs, http_req_failed.
local function timed(fn, ...)
  client = client or mw.http.client{ max_per_origin = 100000, max_idle = 100000, local_host = source }
  local t0 = hrtime()
  local res, err, code = fn(client, ...)
  local body_ok = true
  if res then
    -- read the body so the connection is reused, and time it as part of the request
    local ok = res:body()
    body_ok = ok ~= nil
  end
  M.trend("http_req_duration"):add((hrtime() - t0) / 1e6)
  M.counter("http_reqs"):add(1)
  local failed = not res or not body_ok or res.status >= 400
  local f = registry.checks.http_req_failed or { pass = 0, fail = 0, rate = true }
  registry.checks.http_req_failed = f
  -- a "rate" metric: pass counts the failures, fail counts the successes
  if failed then f.pass = f.pass + 1 else f.fail = f.fail + 1 end
  return res, err, code
end

M.http = {
  get = function(url, opts) return timed(function(c, ...) return c:get(...) end, url, opts) end,
  post = function(url, body, opts) return timed(function(c, ...) return c:post(...) end, url, body, opts) end,
  request = function(opts) return timed(function(c, o) return c:request(o) end, opts) end,
}

return M
