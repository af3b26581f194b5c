--- `moonwire bench --agent redis://...`: a load machine of a distributed test. It announces
-- itself (a heartbeat key with a TTL), waits for a job in its Redis list, runs its share of
-- the test on its own bench threads starting at the instant the coordinator chose (Redis
-- TIME, corrected by this machine's measured clock offset), streams per-second interval
-- snapshots (serialized HDR histograms, one stream entry per thread and second; for a
-- scenario, every trend's histogram and the counters and checks of that second), delivers
-- its exact final results until the coordinator acknowledges them, and waits again.
-- It stops its load when the coordinator's heartbeat disappears, and survives a lost Redis
-- connection (it records on and delivers when Redis is back).
local mw = require "moonwire"
local core = require "moonwire.core"
local url = require "moonwire.url"
local serial = require "moonwire.bench.serial"
local dist = require "moonwire.bench.dist"

local hrtime = core.hrtime
local key = dist.key

local M = {}

local thread_code = 'return require("moonwire.bench.engine").thread_main(...)'
local scenario_code = 'return require("moonwire.bench.scenario").thread_main(...)'

local function log(fmt_, ...)
  io.stderr:write(("[%s] "):format(os.date("%H:%M:%S")), fmt_:format(...), "\n")
  io.stderr:flush()
end

local function hostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local h = f and f:read("l")
  if f then f:close() end
  return h or "localhost"
end

-- ---------------------------------------------------------------------------------------
-- in a bench thread: the interval snapshots (plain runs: the engine calls M.reporter's
-- function once a second, cfg.reporter; scenarios: bench/scenario.lua uses M.sender)

--- Returns push(d, h): queues an `interval` entry (d, a table, is serialized; h is a
-- histogram's encoding) that a task sends to the run's stream (kept while Redis is
-- unreachable, at most 600 entries).
function M.sender(rep)
  local link = dist.link(rep.url)
  local queue = {}
  mw.spawn(function()
    while true do
      while queue[1] do
        local q = queue[1]
        if not link:call("XADD", rep.stream, "*", "k", "interval", "a", rep.agent, "d", q.d, "h", q.h) then break end
        table.remove(queue, 1)
      end
      mw.sleep(0.1)
    end
  end)
  return function(d, h)
    if #queue >= 600 then table.remove(queue, 1) end
    queue[#queue + 1] = { d = serial.encode(d), h = h }
  end
end

--- Returns the function the engine's sampler calls each second, before it resets
-- st.second: it queues the second's histogram and counters.
function M.reporter(cfg, _)
  local rep = cfg.report
  local push = M.sender(rep)
  local seq = 0
  local last_count, last_bytes, last_err, last_st = 0, 0, {}, {}
  return function(s)
    seq = seq + 1
    local errors, statuses = {}, {}
    for k, v in pairs(s.errors) do
      errors[k] = v - (last_err[k] or 0)
      last_err[k] = v
    end
    for k, v in pairs(s.statuses) do
      if v ~= (last_st[k] or 0) then statuses[k] = v - (last_st[k] or 0) end
      last_st[k] = v
    end
    -- the second's counts and status codes; rq: the thread's Req/Sec histogram so far (the
    -- latest one received stands for a lost agent's thread)
    local d = { th = rep.thread, seq = seq, t = (hrtime() - s.t_start) / 1e9, n = s.count - last_count,
      bytes = s.bytes - last_bytes, errors = errors, st = statuses, rq = s.requests:encode() }
    last_count, last_bytes = s.count, s.bytes
    push(d, s.second:encode())
  end
end

-- ---------------------------------------------------------------------------------------
-- the agent process

local function writefile(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- Watches the coordinator while a job runs: its heartbeat key (refreshed twice a second
-- with a TTL: absent = it expired, so the coordinator is gone; but after a reconnection
-- Redis may have lost it, so a key missing counts only once the connection has been up for
-- a TTL) and the run's stop key. Calls on_stop(reason) once.
local function watch(link, run, on_stop, done)
  while not done() do
    local v = link:call("MGET", key("run", run, "coord"), key("run", run, "stop"))
    if v then
      if v[2] ~= dist.null then return on_stop("stopped by the coordinator") end
      if v[1] == dist.null and dist.gone(link) then return on_stop("coordinator gone") end
    end
    mw.sleep(0.25)
  end
end

-- Prepares and runs one job; returns the final message (a table) or nil when the job was
-- abandoned before it started.
local function run_job(a, job)
  local run = job.run
  local link, blk = a.link, a.blk
  local function event(kind, d)
    return link:call("XADD", key("run", run, "events"), "*", "k", kind, "a", a.name, "d", serial.encode(d))
  end
  local files = {}
  local function tmpfile(src)
    local p = os.tmpname()
    files[#files + 1] = p
    writefile(p, src)
    return p
  end
  local ok, prep = pcall(function()
    local p = {}
    if job.kind == "http" then
      local target = assert(url.parse(job.o.url))
      target.port_given = job.o.url:match("^%a+://[^/]*:(%d+)") and target.port or nil
      local addrs, derr = mw.resolve(target.host, target.port)
      if not addrs or #addrs == 0 then error("cannot resolve " .. target.host .. ": " .. tostring(derr), 0) end
      p.target, p.addr = target, { host = addrs[1].host, port = addrs[1].port }
      if job.script_src then p.script = tmpfile(job.script_src) end
    else
      p.scenario = tmpfile(job.scenario_src)
    end
    return p
  end)
  if not ok then
    event("error", { error = tostring(prep) })
    for _, f in ipairs(files) do os.remove(f) end
    return nil
  end
  local offset, rtt = dist.clock_offset(link)
  event("ready", { offset = offset, rtt = rtt, threads = #job.threads })
  local go = blk:call("BLPOP", key("run", run, "go", a.name), dist.GO_WAIT)
  local start_us = go and go ~= dist.null and math.tointeger(tonumber(go[2]))
  if not start_us then
    log("run %s: no start signal, job dropped", run)
    for _, f in ipairs(files) do os.remove(f) end
    return nil
  end
  -- the clock offset again, just before the start (it was measured up to 15 s ago)
  local off2, rtt2 = dist.clock_offset(link, 5)
  if off2 then offset, rtt = off2, rtt2 end
  local start_at = offset and (start_us - offset) * 1000 or hrtime()
  log("run %s: %d threads, start in %.0f ms (clock offset %d us, rtt %d us)", run, #job.threads,
    (start_at - hrtime()) / 1e6, offset or 0, rtt or 0)

  local n = #job.threads
  local http = job.kind == "http"
  local stop_cell = http and 3 * n + 1 or 1
  local shared = core.counters(stop_cell)
  local handles, failures = {}, {}
  for i, th in ipairs(job.threads) do
    local cfg
    if http then
      local o = job.o
      cfg = {
        -- thread_id: this agent's index (its counter cells); wrk_thread_id: the test-wide
        -- number wrk.thread.id reports, as in one process with T threads (all_threads: the
        -- -R schedules of all threads interleave)
        thread_id = i, wrk_thread_id = th.g, threads = n, all_threads = job.T, target = prep.target,
        headers = o.headers, addr = prep.addr,
        conns_in_thread = th.conns, duration = o.duration, timeout = o.timeout, rate = th.rate,
        pipeline = o.pipeline, method = o.method, body = o.body, script = prep.script,
        script_args = o.script_args, verify = o.verify, counters = shared:address(), url = o.url,
        source = a.source, start_at = start_at, reporter = "moonwire.bench.agent",
        report = { url = a.url, stream = key("run", run, "events"), agent = a.name, thread = th.g },
      }
    else
      cfg = { thread_id = th.g, threads = job.T, scenario = prep.scenario, data = job.data,
        start_at = start_at, counters = shared:address(), stop_cell = stop_cell, source = a.source,
        report = { url = a.url, stream = key("run", run, "events"), agent = a.name, thread = th.g } }
    end
    local h = core.thread()
    for name, v in pairs(th.set or {}) do h:set(name, v) end
    local started, serr = h:start(http and thread_code or scenario_code, serial.encode(cfg))
    if started then handles[i] = h else failures[#failures + 1] = ("thread %d cannot start: %s"):format(th.g, serr) end
  end
  local finished, stopped = false, nil
  if #failures > 0 then shared:set(stop_cell, 1) end
  mw.spawn(watch, link, run, function(reason)
    stopped = reason
    log("run %s: %s, stopping the load", run, reason)
    shared:set(stop_cell, 1)
  end, function() return finished end)
  local results = {}
  for i, h in pairs(handles) do
    local s, terr = h:join()
    if s then
      local r = serial.decode(s)
      r.g = job.threads[i].g
      r.started_us = offset and (r.t_start // 1000 + offset) or nil
      r.mono_start_ns, r.t_start = r.t_start, nil   -- this machine's monotonic clock
      results[#results + 1] = r
    else
      failures[#failures + 1] = ("thread %d failed: %s"):format(job.threads[i].g, tostring(terr))
      shared:set(stop_cell, 1)
    end
  end
  finished = true
  for _, f in ipairs(files) do os.remove(f) end
  table.sort(results, function(x, y) return x.g < y.g end)
  return { results = results, failures = failures, offset = offset, rtt = rtt, start_us = start_us,
    stopped = stopped, threads = n }
end

-- Delivers the final message until the coordinator acknowledges it (it may be retried
-- across a Redis restart), or the coordinator is gone.
local function deliver(a, run, final)
  local body = serial.encode(final)
  while true do
    local sent = a.link:call("XADD", key("run", run, "events"), "*", "k", "final", "a", a.name, "d", body)
    if sent then
      local ack = a.blk:call("BLPOP", key("run", run, "ack", a.name), 2)
      if ack and ack ~= dist.null then return true end
      local c = a.link:call("EXISTS", key("run", run, "coord"))
      if c == 0 and dist.gone(a.link) then return false end
    else
      mw.sleep(0.2)
    end
  end
end

-- Why a decoded job cannot be run (nil: it can): its shape as the coordinator writes it.
local function bad_job(job)
  if type(job) ~= "table" then return "not a table" end
  if math.type(job.run) ~= "integer" then return "no run id" end
  if math.type(job.T) ~= "integer" or job.T < 1 then return "no thread total" end
  if type(job.deadline_us) ~= "number" then return "no deadline" end
  if type(job.threads) ~= "table" or #job.threads < 1 then return "no threads" end
  for _, th in ipairs(job.threads) do
    if type(th) ~= "table" or math.type(th.g) ~= "integer" then return "a bad thread entry" end
    if th.set ~= nil and type(th.set) ~= "table" then return "a bad thread entry" end
  end
  if job.kind == "http" then
    if type(job.o) ~= "table" or type(job.o.url) ~= "string" then return "no URL" end
    if job.script_src ~= nil and type(job.script_src) ~= "string" then return "a bad script" end
  elseif job.kind == "scenario" then
    if type(job.scenario_src) ~= "string" then return "no scenario" end
  else
    return "an unknown kind"
  end
end

--- The agent's main loop (never returns unless Redis refuses the URL at the start).
-- A job that cannot be read or run is logged and skipped: the agent waits for the next.
function M.main(o)
  local a = {
    url = o.agent, source = o.source, link = dist.link(o.agent), blk = dist.link(o.agent, dist.BLOCK_TIMEOUT),
  }
  a.name = o.agent_name or (hostname() .. ":" .. core.getpid())
  local info = { name = a.name, host = hostname(), pid = core.getpid(), threads = o.threads,
    source = o.source, state = "idle" }
  local ok, err = pcall(mw.run, function()
    local c, cerr = a.link:conn()
    if not c then error("cannot connect to " .. o.agent .. ": " .. tostring(cerr), 0) end
    -- the heartbeat; also written at once when the state changes (the coordinator reads a
    -- busy agent's return to idle as the job given up)
    local function beat()
      a.link:call("SET", key("agent", a.name), serial.encode(info), "PX", math.floor(dist.TTL * 1000))
    end
    mw.spawn(function()
      while true do
        beat()
        a.link:call("ZADD", key("agents"), os.time(), a.name)
        mw.sleep(dist.HEARTBEAT)
      end
    end)
    log("agent %s: %d threads%s, waiting for work on %s", a.name, o.threads,
      o.source and (", source " .. o.source) or "", o.agent)
    while true do
      local v = a.blk:call("BLPOP", key("agent", a.name, "jobs"), 1)
      if v and v ~= dist.null then
        local jok, job = pcall(serial.decode, v[2])
        local why = not jok and tostring(job) or bad_job(job)
        local now = not why and dist.redis_time(a.link)
        if why then log("bad job ignored: %s", why)
        elseif now and now > job.deadline_us then log("run %s: stale job dropped", job.run)
        else
          info.state, info.run = "busy", job.run
          beat()
          local rok, rerr = pcall(function()
            local final = run_job(a, job)
            if final then
              local delivered = deliver(a, job.run, final)
              log("run %s: %s", job.run, delivered and "results delivered" or "coordinator gone, results dropped")
            end
          end)
          if not rok then log("run %s: failed: %s", job.run, tostring(rerr)) end
          info.state, info.run = "idle", nil
          beat()
        end
      elseif not v then
        mw.sleep(0.2)
      end
    end
  end)
  if not ok then
    io.stderr:write("moonwire bench: ", (tostring(err):gsub("\n?stack traceback:.*$", "")), "\n")
    return 2
  end
  return 0
end

return M
