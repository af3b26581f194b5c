--- `moonwire bench`: wrk's flags, wrk's output, wrk's scripts; plus constant-rate mode with
-- coordinated-omission correction, HDR percentiles, JSON and HTML reports, thresholds,
-- pipelining and https.
local mw = require "moonwire"
local core = require "moonwire.core"
local url = require "moonwire.url"
local serial = require "moonwire.bench.serial"
local wrkenv = require "moonwire.bench.wrk"
local fmt = require "moonwire.bench.format"

local M = {}

local usage = [[
Usage: moonwire bench <options> <url> [-- script args]
  Options (as wrk's):
    -c, --connections <N>  Connections to keep open      (10)
    -d, --duration    <T>  Duration of test              (10s)
    -t, --threads     <N>  Number of threads to use      (2)
    -s, --script      <S>  Load Lua script file
    -H, --header      <H>  Add header to request
        --latency          Print latency statistics
        --timeout     <T>  Socket/request timeout        (2s)
  Beyond wrk:
    -R, --rate        <N>  Constant rate (requests/s, all threads), latency corrected for
                           coordinated omission (open model)
        --pipeline    <N>  Pipeline N requests per connection
        --h2               HTTP/2: prior knowledge on http://, ALPN h2 on https://
    -m, --streams     <N>  HTTP/2 concurrent streams per connection (1), as h2load's -m
    -m, --method      <M>  Request method (GET); -m with a number means --streams
    -b, --body        <B>  Request body
        --json      <FILE> Write the results as JSON ("-": stdout)
        --html      <FILE> Write a self-contained HTML report
        --threshold <EXPR> Fail (exit 1) unless EXPR holds: 'p99<50ms', 'p50<=10ms',
                           'errors<0.1%', 'rps>10000', 'mean<5ms', 'max<1s' (repeatable)
        --verify           Verify https certificates (off by default, as in wrk)
        --quiet            No progress line
        --scenario  <FILE> Run virtual users from a scenario file instead of a URL
  Distributed (coordinated through Redis; docs/bench.md):
        --agent      <URL> Run as an agent: wait for work at redis://HOST[:PORT][/DB]
                           (or rediss://); -t is the capacity it announces
        --agent-name <N>   The agent's name (host:pid)
        --source     <IP>  Bind the load connections to this source address
        --agents     <N>   Run the test on N agents (with --via)
        --via        <URL> The Redis the agents wait on
        --agent-wait <T>   How long to wait for the agents           (30s)
        --on-agent-loss <continue|stop>  When an agent is lost       (continue)
  Numbers accept SI units (1k, 1M); times accept units (2s, 1m, 2h, 500ms).
]]

-- A failure ends the run with one line: a script's error (a missing -s file, a hook that
-- raised in a thread) comes with the tracebacks of the layers it went through, which
-- say where moonwire caught it, not where the script went wrong (its message says that).
local function die(msg)
  msg = tostring(msg):gsub("\n?stack traceback:.*$", "")
  io.stderr:write("moonwire bench: ", msg, "\n")
  return 2
end

-- options a scenario does not use (its stages set the duration, its users their requests)
local URL_ONLY = {}
for _, a in ipairs{ "-c", "--connections", "-d", "--duration", "-s", "--script", "-H", "--header", "--latency",
  "--timeout", "-R", "--rate", "--pipeline", "-m", "--method", "--streams", "--h2", "-b", "--body" } do
  URL_ONLY[a] = true
end

M.MAX_THREADS = (4096 - 1) // 3

local function parse_args(argv)
  local o = { connections = 10, threads = 2, duration = 10, timeout = 2, headers = {}, thresholds = {},
    pipeline = 1, script_args = {} }
  local i = 1
  local function value(name)
    i = i + 1
    local v = argv[i]
    if v == nil then error(("option %s needs a value"):format(name), 0) end
    return v
  end
  -- the option's value read by parse (fmt.count, fmt.duration); one that does not parse is
  -- an error naming the option, never a default taken in silence
  local function number(name, parse)
    local v = value(name)
    local n = parse(v)
    if not n then error(("bad value for %s: '%s'"):format(name, v), 0) end
    return n
  end
  local given = {}   -- the options of a URL run given, refused with --scenario
  while i <= #argv do
    local a = argv[i]
    local long, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    if long then a = long table.insert(argv, i + 1, inline) end
    local short, attached = a:match("^(%-[cdtsHRmb])(.+)$")   -- getopt style: -t2, -c100
    if short then a = short table.insert(argv, i + 1, attached) end
    if URL_ONLY[a] then given[#given + 1] = a end
    if a == "--" then
      for j = i + 1, #argv do o.script_args[#o.script_args + 1] = argv[j] end
      break
    elseif a == "-c" or a == "--connections" then o.connections = number(a, fmt.count)
    elseif a == "-d" or a == "--duration" then o.duration = number(a, fmt.duration)
    elseif a == "-t" or a == "--threads" then
      o.threads = number(a, fmt.count)
      o.threads_given = true
    elseif a == "-s" or a == "--script" then o.script = value(a)
    elseif a == "-H" or a == "--header" then
      local h = value(a)
      local k, v = h:match("^%s*([^:]+):%s*(.-)%s*$")
      if not k then error("bad header '" .. h .. "' (Name: value expected)", 0) end
      o.headers[k] = v
    elseif a == "--latency" then o.latency = true
    elseif a == "--timeout" then o.timeout = number(a, fmt.duration)
    elseif a == "-R" or a == "--rate" then o.rate = number(a, fmt.count)
    elseif a == "--pipeline" then o.pipeline = number(a, fmt.count)
    elseif a == "-m" then
      -- h2load's -m (streams per connection) when numeric; else the method, as before
      local v = value(a)
      if v:match("^%d+[kK]?$") then o.streams = fmt.count(v)
      elseif v:match("^[%d.]+[kKmM]?$") then error(("bad value for %s: '%s' (streams: a whole number)"):format(a, v), 0)
      else o.method = v:upper() end
    elseif a == "--method" then o.method = value(a):upper()
    elseif a == "--streams" then o.streams = number(a, fmt.count)
    elseif a == "--h2" then o.h2 = true
    elseif a == "-b" or a == "--body" then o.body = value(a)
    elseif a == "--json" then o.json = value(a)
    elseif a == "--html" then o.html = value(a)
    elseif a == "--threshold" then o.thresholds[#o.thresholds + 1] = value(a)
    elseif a == "--verify" then o.verify = true
    elseif a == "--quiet" then o.quiet = true
    elseif a == "--scenario" then o.scenario = value(a)
    elseif a == "--agent" then o.agent = value(a)
    elseif a == "--agent-name" then o.agent_name = value(a)
    elseif a == "--source" then o.source = value(a)
    elseif a == "--agents" then o.agents = number(a, fmt.count)
    elseif a == "--via" then o.via = value(a)
    elseif a == "--agent-wait" then o.agent_wait = number(a, fmt.duration)
    elseif a == "--on-agent-loss" then
      o.on_agent_loss = value(a)
      if o.on_agent_loss ~= "continue" and o.on_agent_loss ~= "stop" then
        error("--on-agent-loss takes continue or stop", 0)
      end
    elseif a == "-h" or a == "--help" then o.help = true
    elseif a:sub(1, 1) == "-" and #a > 1 then error("unknown option " .. a, 0)
    elseif not o.url then o.url = a
    else o.script_args[#o.script_args + 1] = a end
    i = i + 1
  end
  -- (counts are whole: 0.5 thread or pipeline depth is no count)
  for _, k in ipairs{ "connections", "threads", "pipeline" } do
    if o[k] then o[k] = math.floor(o[k]) end
  end
  for _, k in ipairs{ "connections", "threads", "duration", "timeout", "pipeline" } do
    if not o[k] or o[k] <= 0 then error(("bad value for %s"):format(k), 0) end
  end
  if o.scenario and #given > 0 then
    error(("--scenario does not take %s (the scenario sets its duration, users and requests)"):format(given[1]), 0)
  end
  if o.scenario and o.url then error("--scenario takes no URL (the scenario's users name theirs)", 0) end
  if o.connections < o.threads and not o.scenario then error("number of connections must be >= threads", 0) end
  -- the threads' shared counters: 3 cells each and the stop flag, in core.counters' 4096
  if o.threads > M.MAX_THREADS and not o.scenario then
    error(("too many threads: %d (at most %d)"):format(o.threads, M.MAX_THREADS), 0)
  end
  if o.rate and o.rate <= 0 then error("bad value for rate", 0) end
  if o.rate and o.pipeline > 1 then error("--rate and --pipeline do not go together", 0) end
  if o.streams and (o.streams < 1 or o.streams ~= math.floor(o.streams)) then error("bad value for streams", 0) end
  if o.streams and not o.h2 then error("-m N (streams per connection) needs --h2", 0) end
  if o.h2 and o.pipeline > 1 then error("--pipeline is for HTTP/1.1 (use -m for HTTP/2 streams)", 0) end
  if o.agents then
    if o.agents < 1 or o.agents ~= math.floor(o.agents) then error("bad value for agents", 0) end
    o.agents = math.floor(o.agents)
    if not o.via then error("--agents needs --via redis://...", 0) end
  elseif o.via then error("--via needs --agents N", 0) end
  for _, u in ipairs{ o.agent or false, o.via or false } do
    if u and not u:match("^rediss?://") then
      error("bad Redis URL '" .. u .. "' (redis:// or rediss:// expected)", 0)
    end
  end
  if o.agent and o.agents then error("--agent and --agents do not go together", 0) end
  if o.agent_wait and o.agent_wait <= 0 then error("bad value for agent-wait", 0) end
  -- thresholds are judged after the run: one that cannot be is refused before it
  local parse = o.scenario and require("moonwire.bench.scenario").parse_threshold or M.parse_threshold
  for _, expr in ipairs(o.thresholds) do
    local t, terr = parse(expr)
    if not t then error(terr, 0) end
  end
  return o
end
M.parse_args = parse_args

-- ---------------------------------------------------------------------------------------
-- statistics objects as wrk's done() sees them

local function stats_object(h)
  local count, min, max, mean, stdev = h:stats()
  local buckets
  local obj = { min = min, max = max, mean = mean, stdev = stdev, count = count, _h = h }
  function obj.percentile(_, p) return h:percentile(p) end
  return setmetatable(obj, {
    __call = function(_, i)
      buckets = buckets or h:buckets()
      local b = buckets[i]
      if b then return b[1], b[2] end
    end,
    __len = function()
      buckets = buckets or h:buckets()
      return #buckets
    end,
    __index = function(_, i)
      if math.type(i) == "integer" then
        buckets = buckets or h:buckets()
        local b = buckets[i]
        return b and b[1]
      end
    end,
  })
end
M.stats_object = stats_object

-- ---------------------------------------------------------------------------------------
-- thresholds

local LATENCY = { mean = "mean", max = "max", min = "min" }

--- Parses 'p99<50ms' style expressions -> { name, op, limit, unit, p } or nil, message.
-- Run before the test (parse_args), so a threshold that cannot be judged is a usage error.
function M.parse_threshold(expr)
  local name, op, val = expr:match("^%s*([%w.]+)%s*([<>]=?)%s*(.-)%s*$")
  if not name or val == "" then return nil, "cannot parse threshold '" .. expr .. "'" end
  local t = { name = name, op = op }
  local p = name:match("^p(.*)$")
  if p and not LATENCY[name] then
    t.p = fmt.rank(p)
    if not t.p then return nil, "bad percentile in threshold '" .. expr .. "' (p50, p99.9: above 0, at most 100)" end
  end
  if t.p or LATENCY[name] then
    local secs = fmt.threshold_time(val)
    if not secs then
      return nil, "bad value in threshold '" .. expr .. "' (a time: 100us, 50ms, 1s, 2m, 1h; a bare number is ms)"
    end
    t.limit, t.unit = secs * 1e6, "us"
  elseif name == "errors" then
    local pct = val:match("^([%d.]+)%s*%%$")
    t.limit, t.unit = tonumber(pct or val), pct and "%" or ""
  elseif name == "rps" or name == "requests" then t.limit, t.unit = fmt.count(val), ""
  else return nil, "unknown metric '" .. name .. "' in threshold '" .. expr .. "'" end
  if not t.limit then return nil, "bad value in threshold '" .. expr .. "'" end
  return t
end

local function compare(op, actual, limit)
  if op == "<" then return actual < limit elseif op == "<=" then return actual <= limit
  elseif op == ">" then return actual > limit else return actual >= limit end
end
M.compare = compare

--- Evaluates 'p99<50ms' style expressions against a result; returns ok, message.
function M.check_threshold(expr, r)
  local t, perr = M.parse_threshold(expr)
  if not t then return false, perr end
  local name, unit = t.name, t.unit
  -- a latency of a run in which no request completed is unknown, not 0: it fails
  if unit == "us" and r.latency.count == 0 then
    return false, ("FAIL %s (no samples: no request completed)"):format(expr)
  end
  local actual
  if t.p then actual = r.latency:percentile(t.p)
  elseif LATENCY[name] then actual = r.latency[LATENCY[name]]
  elseif name == "rps" then actual = r.rps
  elseif name == "errors" then
    -- a share of the attempts (responses, and requests that got none), not of the responses
    actual = unit == "%" and (r.attempts > 0 and 100 * r.errors_total / r.attempts or 0) or r.errors_total
  else actual = r.requests_total end
  local ok = compare(t.op, actual, t.limit)
  local shown = unit == "us" and fmt.time_us(actual) or (unit == "%" and ("%.3f%%"):format(actual))
    or tostring(math.tointeger(actual) or ("%.2f"):format(actual))
  return ok, ("%s %s (actual %s)"):format(ok and "PASS" or "FAIL", expr, shown)
end

--- What a loaded wrk script `env` cannot go with (one process and the coordinator alike):
-- -> nil, or the usage error.
function M.script_conflict(o, env)
  if o.pipeline > 1 and env.request then
    return "--pipeline does not go with a script's request() (it pipelines by returning several requests)"
  end
end

-- ---------------------------------------------------------------------------------------
-- the end of a run, one process or distributed (bench/coordinator.lua): done(), thresholds

--- Calls a wrk script's done() on merged results `r`. One that raises fails as a script hook
-- does (exit status 2), but the thresholds are still judged and the report, the JSON and the
-- HTML of a run that happened are still written. Returns the exit status so far (0 or 2).
function M.call_done(done, r)
  if not done then return 0 end
  local ok, err = xpcall(done, debug.traceback, { duration = r.duration_us, requests = r.requests_total,
    bytes = r.bytes, errors = r.errors }, r.latency, r.requests)
  if ok then return 0 end
  io.stderr:write("moonwire bench: done() failed: ", tostring(err), "\n")
  return 2
end

--- Judges threshold expressions `exprs` on `r` with `check` (M.check_threshold, or the
-- scenario's), writing one PASS/FAIL line each to `out`. Returns the results
-- ({ expr, pass, message } each) and the exit status they call for (0 or 1).
function M.judge(exprs, r, check, out)
  local tres, code = {}, 0
  for _, expr in ipairs(exprs) do
    local pass, msg = check(expr, r)
    tres[#tres + 1] = { expr = expr, pass = pass, message = msg }
    if out then out:write(msg, "\n") end
    if not pass then code = 1 end
  end
  return tres, code
end

--- A scenario's thresholds, then those of the command line.
function M.scenario_thresholds(sc, o)
  local all = {}
  for _, e in ipairs(sc.thresholds or {}) do all[#all + 1] = e end
  for _, e in ipairs(o.thresholds) do all[#all + 1] = e end
  return all
end

-- ---------------------------------------------------------------------------------------
-- output

--- wrk's first lines: what is about to run (before the run, as wrk prints them).
function M.print_header(o, out)
  out:write(("Running %s test @ %s\n"):format(fmt.time_us(o.duration * 1e6):gsub("%.00", ""), o.url))
  out:write(("  %d threads and %d connections\n"):format(o.threads, o.connections))
  out:flush()
end

--- wrk's report of merged results `r`; `header_done`: M.print_header ran before the run.
function M.print_wrk(o, r, out, header_done)
  local lat, req = r.latency, r.requests
  if not header_done then M.print_header(o, out) end
  out:write("  Thread Stats   Avg      Stdev     Max   +/- Stdev\n")
  local function within(s)
    return s._h:within(s.mean - s.stdev, s.mean + s.stdev)
  end
  out:write(("    Latency %9s %9s %9s %8.2f%%\n"):format(fmt.time_us(lat.mean), fmt.time_us(lat.stdev),
    fmt.time_us(lat.max), within(lat)))
  out:write(("    Req/Sec %9s %9s %9s %8.2f%%\n"):format(fmt.metric(req.mean), fmt.metric(req.stdev),
    fmt.metric(req.max), within(req)))
  if o.latency then
    out:write("  Latency Distribution\n")
    for _, p in ipairs{ 50, 75, 90, 99 } do
      out:write(("    %3d%% %9s\n"):format(p, fmt.time_us(lat:percentile(p))))
    end
    out:write("  HDR Percentiles\n")
    for _, p in ipairs{ 99.9, 99.99, 99.999 } do
      out:write(("  %7.3f%% %9s\n"):format(p, fmt.time_us(lat:percentile(p))))
    end
  end
  out:write(("  %d requests in %s, %s read\n"):format(r.requests_total, fmt.time_us(r.duration_us),
    fmt.bytes(r.bytes)))
  local e = r.errors
  if e.connect + e.read + e.write + e.timeout > 0 then
    out:write(("  Socket errors: connect %d, read %d, write %d, timeout %d\n"):format(e.connect, e.read,
      e.write, e.timeout))
  end
  if e.status > 0 then out:write(("  Non-2xx or 3xx responses: %d\n"):format(e.status)) end
  if r.hung > 0 then out:write(("  Requests without an answer at the end: %d\n"):format(r.hung)) end
  out:write(("Requests/sec: %9.2f\n"):format(r.rps))
  out:write(("Transfer/sec: %9s\n"):format(fmt.bytes(r.bytes / (r.duration_us / 1e6))))
  if o.rate then
    -- (-R 0.5 is half a request a second, not "0/s")
    local asked = math.tointeger(o.rate) or ("%.2f"):format(o.rate)
    out:write(("Requested rate: %s/s, achieved %.2f/s\n"):format(asked, r.rps))
  end
  local h2 = r.h2
  if h2 then
    out:write(("HTTP/2: %d connections x %d streams, %d reconnects, %d REFUSED_STREAM retries\n"):format(
      o.connections, h2.streams, h2.reconnects, h2.refused_retries))
    local function codes(name, t)
      local keys = {}
      for k in pairs(t) do keys[#keys + 1] = k end
      table.sort(keys)
      local parts = {}
      for _, k in ipairs(keys) do parts[#parts + 1] = k .. " " .. t[k] end
      out:write(("  %s received: %s\n"):format(name, #parts > 0 and table.concat(parts, ", ") or "none"))
    end
    codes("RST_STREAM", h2.rst)
    codes("GOAWAY", h2.goaway)
    local tt = h2.ttfb
    out:write(("  Time to first byte: mean %s, p50 %s, p99 %s, max %s\n"):format(fmt.time_us(tt.mean),
      fmt.time_us(tt:percentile(50)), fmt.time_us(tt:percentile(99)), fmt.time_us(tt.max)))
  end
end

function M.json_doc(o, r)
  local lat = r.latency
  local pct = {}
  for _, p in ipairs{ 50, 75, 90, 95, 99, 99.9, 99.99, 99.999 } do pct[tostring(p)] = lat:percentile(p) end
  local json = require "moonwire.bench.json"
  local doc = {
    url = o.url, threads = o.threads, connections = o.connections, duration_s = r.duration_us / 1e6,
    rate = o.rate or json.null, pipeline = o.pipeline,
    requests = r.requests_total, bytes = r.bytes, rps = r.rps,
    errors = r.errors, hung = r.hung, statuses = r.statuses,
    latency_us = { min = lat.min, max = lat.max, mean = lat.mean, stdev = lat.stdev, percentiles = pct },
    requests_per_thread_per_s = { mean = r.requests.mean, stdev = r.requests.stdev, max = r.requests.max },
    timeline = json.array(r.timeline), thresholds = json.array(r.threshold_results or {}),
  }
  if r.h2 then
    local tt = r.h2.ttfb
    local tp = {}
    for _, p in ipairs{ 50, 75, 90, 95, 99, 99.9, 99.99, 99.999 } do tp[tostring(p)] = tt:percentile(p) end
    doc.h2 = { streams = r.h2.streams, reconnects = r.h2.reconnects, refused_retries = r.h2.refused_retries,
      rst = r.h2.rst, goaway = r.h2.goaway,
      ttfb_us = { min = tt.min, max = tt.max, mean = tt.mean, stdev = tt.stdev, percentiles = tp } }
  end
  return doc
end

function M.json(o, r)
  return require("moonwire.bench.json").encode(M.json_doc(o, r))
end

-- ---------------------------------------------------------------------------------------
-- the run

local thread_code = 'return require("moonwire.bench.engine").thread_main(...)'

function M.merge_results(results)
  local lat, req = core.histogram(), core.histogram()
  local total, bytes, dur, hung = 0, 0, 0, 0
  local errors = { connect = 0, read = 0, write = 0, status = 0, timeout = 0 }
  local statuses, timeline = {}, {}
  local h2
  for _, res in ipairs(results) do
    if res.h2 then
      h2 = h2 or { streams = res.h2.streams, reconnects = 0, refused_retries = 0, rst = {}, goaway = {},
        ttfb = core.histogram() }
      h2.reconnects = h2.reconnects + res.h2.reconnects
      h2.refused_retries = h2.refused_retries + res.h2.refused_retries
      for k, v in pairs(res.h2.rst) do h2.rst[k] = (h2.rst[k] or 0) + v end
      for k, v in pairs(res.h2.goaway) do h2.goaway[k] = (h2.goaway[k] or 0) + v end
      h2.ttfb:merge(core.histogram_decode(res.h2.ttfb))
    end
    lat:merge(core.histogram_decode(res.latency))
    req:merge(core.histogram_decode(res.requests))
    total, bytes, hung = total + res.count, bytes + res.bytes, hung + res.hung
    if res.duration_us > dur then dur = res.duration_us end
    for k, v in pairs(res.errors) do errors[k] = errors[k] + v end
    for k, v in pairs(res.statuses) do statuses[k] = (statuses[k] or 0) + v end
    for i, s in ipairs(res.timeline) do
      local t = timeline[i]
      if not t then
        timeline[i] = { t = s.t, rps = s.rps, p50 = s.p50, p99 = s.p99, max = s.max, errors = s.errors }
      else
        t.rps = t.rps + s.rps
        t.errors = t.errors + s.errors
        if s.p99 > t.p99 then t.p99 = s.p99 end
        if s.p50 > t.p50 then t.p50 = s.p50 end
        if s.max > t.max then t.max = s.max end
      end
    end
  end
  local errors_total = errors.connect + errors.read + errors.write + errors.timeout + errors.status
  -- what was tried: every response (a status error is one) and every attempt that got none
  local attempts = total + errors.connect + errors.read + errors.write + errors.timeout
  return {
    latency = stats_object(lat), requests = stats_object(req), requests_total = total, bytes = bytes,
    duration_us = dur, errors = errors, errors_total = errors_total, attempts = attempts, statuses = statuses,
    rps = dur > 0 and total / (dur / 1e6) or 0, timeline = timeline, hung = hung,
    h2 = h2 and { streams = h2.streams, reconnects = h2.reconnects, refused_retries = h2.refused_retries,
      rst = h2.rst, goaway = h2.goaway, ttfb = stats_object(h2.ttfb) },
  }
end

-- Joins every started thread (all at once, so the first failure is seen as it happens);
-- the first failure sets the stop flag, so the others end their run early, and is raised
-- once all have ended: no thread outlives the run, or reports into a run given up on.
-- `failure`: a failure that happened already (a thread that could not start).
local function join_all(handles, shared, stop_cell, failure)
  if failure then shared:set(stop_cell, 1) end
  local results, joiners = {}, {}
  for i, h in pairs(handles) do
    joiners[#joiners + 1] = mw.spawn(function()
      local s, terr = h:join()
      if s then
        results[i] = serial.decode(s)
      else
        failure = failure or ("thread " .. i .. " failed: " .. tostring(terr))
        shared:set(stop_cell, 1)
      end
    end)
  end
  for _, j in ipairs(joiners) do j:join() end
  if failure then error(failure, 0) end
  return results
end

-- Ctrl-C ends the run early, as its end would: the stop cell is set, the threads stop, the
-- report (and the JSON) covers what ran. Set before the threads start: they inherit the
-- signal mask. Returns the state ({ interrupted }) and a to-be-closed handler removal.
local function stop_on_sigint(shared, stop_cell)
  local st = { interrupted = false }
  mw.signal("SIGINT", function()
    st.interrupted = true
    shared:set(stop_cell, 1)
  end)
  return st, setmetatable({}, { __close = function() mw.signal("SIGINT", nil) end })
end

local function progress_line(o, shared, t0)
  local last, last_t = 0, mw.now()
  while mw.sleep(1) do   -- ends when cancelled
    local count, errs, p99 = 0, 0, 0
    for i = 0, o.threads - 1 do
      count = count + shared:get(3 * i + 1)
      errs = errs + shared:get(3 * i + 2)
      p99 = math.max(p99, shared:get(3 * i + 3))
    end
    local now = mw.now()
    io.stdout:write(("\r  %5.1fs  %10s req/s  errors %d  p99 %s    "):format(now - t0,
      fmt.metric((count - last) / (now - last_t)), errs, fmt.time_us(p99)))
    io.stdout:flush()
    last, last_t = count, now
  end
end

local scenario_code = 'return require("moonwire.bench.scenario").thread_main(...)'

function M.write_outputs(o, doc_fn, html_fn)
  if o.json then
    local doc = doc_fn()
    if o.json == "-" then io.stdout:write(doc, "\n")
    else
      local f, ferr = io.open(o.json, "w")
      if not f then return die(ferr) end
      f:write(doc, "\n")
      f:close()
    end
  end
  if o.html then
    local f, ferr = io.open(o.html, "w")
    if not f then return die(ferr) end
    f:write(html_fn())
    f:close()
  end
end

local function run_scenario(o)
  local scenario = require "moonwire.bench.scenario"
  local ok, sc = pcall(scenario.load, o.scenario)
  if not ok then return die(sc) end
  local code, merged = 0, nil
  local out = o.json == "-" and io.stderr or io.stdout
  local run_ok, run_err = pcall(mw.run, function()
    local data = sc.setup and sc.setup() or nil
    -- (what setup() returns goes to every thread: data only, said so, not serial.lua's line)
    local sent, why = pcall(serial.encode, data)
    if not sent then
      error(("scenario setup() returned what cannot go to the threads (%s): return tables, strings, "
        .. "numbers and booleans"):format(tostring(why):gsub("^.-:%d+: ", "")), 0)
    end
    local shared = core.counters(1)   -- the stop cell (see join_all)
    local sigint, _sigint <close> = stop_on_sigint(shared, 1)
    out:write(("Running scenario %s: %d threads, %s\n"):format(o.scenario, o.threads,
      fmt.time_us(scenario.total_duration(sc.stages) * 1e6)))
    local started = {}
    for i = 1, o.threads do
      local h = core.thread()
      local started_ok, serr = h:start(scenario_code, serial.encode{ thread_id = i, threads = o.threads,
        scenario = o.scenario, data = data, counters = shared:address(), stop_cell = 1, source = o.source })
      if not started_ok then join_all(started, shared, 1, ("thread %d cannot start: %s"):format(i, tostring(serr))) end
      started[i] = h
    end
    local results = join_all(started, shared, 1)
    if sigint.interrupted then io.stderr:write("moonwire bench: interrupted: the report covers what ran\n") end
    merged = scenario.merge(results)
    out:write(("  max %d users, %.1fs\n"):format(merged.max_users, merged.duration))
    scenario.print(merged, out)
    merged.threshold_results, code = M.judge(M.scenario_thresholds(sc, o), merged, scenario.check_threshold, out)
    if sc.teardown then sc.teardown(data) end
  end)
  if not run_ok then return die(tostring(run_err)) end
  local werr = M.write_outputs(o,
    function() return require("moonwire.bench.json").encode(scenario.json_doc(o, merged, o.threads)) end,
    function() return require("moonwire.bench.report").html(o, scenario.html_result(merged,
      scenario.total_duration(sc.stages))) end)
  return werr or code
end

function M.main(argv)
  local ok, o = pcall(parse_args, argv)
  if not ok then return die(o .. "\n" .. usage) end
  if o.help then io.stdout:write(usage) return 0 end
  if o.agent then return require("moonwire.bench.agent").main(o) end
  if o.agents then return require("moonwire.bench.coordinator").main(o) end
  if o.scenario then return run_scenario(o) end
  if not o.url then return die("a URL is required\n" .. usage) end
  local target, uerr = url.parse(o.url)
  if not target then return die(uerr) end
  if target.scheme ~= "http" and target.scheme ~= "https" then return die("unsupported scheme " .. target.scheme) end
  target.port_given = o.url:match("^%a+://[^/]*:(%d+)") and target.port or nil

  local code = 0
  local result
  local run_ok, run_err = pcall(mw.run, function()
    local addrs, derr = mw.resolve(target.host, target.port)
    if not addrs or #addrs == 0 then error("cannot resolve " .. target.host .. ": " .. tostring(derr), 0) end
    -- the main state: setup() and done() run here, against thread objects
    local main_env, main_wrk = wrkenv.env(target, o.headers, nil)
    main_wrk.method = o.method or "GET"
    main_wrk.body = o.body
    if o.script then wrkenv.load(o.script, main_env) end
    local conflict = M.script_conflict(o, main_env)
    if conflict then error(conflict, 0) end
    -- 3 cells per thread (count, errors, p99) and a stop flag (see join_all)
    local shared = core.counters(3 * o.threads + 1)
    local sigint, _sigint <close> = stop_on_sigint(shared, 3 * o.threads + 1)
    local handles, threads = {}, {}
    for i = 1, o.threads do
      local h = core.thread()
      handles[i] = h
      local th = {
        id = i,
        addr = setmetatable({ host = addrs[1].host, port = addrs[1].port, family = addrs[1].family }, wrkenv.Addr),
      }
      function th.get(_, name) return h:get(name) end
      function th.set(_, name, v) h:set(name, v) end
      function th.stop() end
      threads[i] = th
    end
    if main_env.setup then for _, th in ipairs(threads) do main_env.setup(th) end end
    local out = o.json == "-" and io.stderr or io.stdout
    M.print_header(o, out)
    local per, extra = o.connections // o.threads, o.connections % o.threads
    local t0 = mw.now()
    local started = {}
    for i, h in ipairs(handles) do
      local cfg = {
        thread_id = i, threads = o.threads, target = target, headers = o.headers,
        addr = { host = threads[i].addr.host, port = threads[i].addr.port },
        conns_in_thread = per + (i <= extra and 1 or 0), duration = o.duration, timeout = o.timeout,
        rate = o.rate and o.rate / o.threads, pipeline = o.pipeline, method = o.method or main_wrk.method,
        body = o.body or main_wrk.body, script = o.script, script_args = o.script_args, verify = o.verify,
        counters = shared:address(), url = o.url, h2 = o.h2, streams = o.streams or 1, source = o.source,
      }
      local started_ok, serr = h:start(thread_code, serial.encode(cfg))
      if not started_ok then
        join_all(started, shared, 3 * o.threads + 1, ("thread %d cannot start: %s"):format(i, tostring(serr)))
      end
      started[i] = h
    end
    local prog
    if not o.quiet and core.isatty(1) and o.json ~= "-" then prog = mw.spawn(progress_line, o, shared, t0) end
    local results = join_all(started, shared, 3 * o.threads + 1)
    if prog then prog:cancel() io.stdout:write("\r", (" "):rep(70), "\r") end
    if sigint.interrupted then io.stderr:write("moonwire bench: interrupted: the report covers what ran\n") end
    result = M.merge_results(results)
    M.print_wrk(o, result, out, true)
    local done_code = M.call_done(main_env.done, result)
    local tcode
    result.threshold_results, tcode = M.judge(o.thresholds, result, M.check_threshold, out)
    code = math.max(done_code, tcode)
    local _ = shared
  end)
  if not run_ok then return die(tostring(run_err)) end
  local werr = M.write_outputs(o, function() return M.json(o, result) end,
    function() return require("moonwire.bench.report").html(o, result) end)
  if werr then return werr end
  return code
end

return M
