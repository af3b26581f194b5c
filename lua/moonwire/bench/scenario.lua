--- Runs a scenario's virtual users in one bench thread, and merges the threads' metrics.
local mw = require "moonwire"
local core = require "moonwire.core"
local serial = require "moonwire.bench.serial"
local fmt = require "moonwire.bench.format"
local bench = require "moonwire.bench"

local hrtime = core.hrtime

local M = {}

--- Loads a scenario file (in the current state) and checks its shape.
function M.load(path)
  local chunk, err = loadfile(path)
  if not chunk then error("cannot load scenario: " .. err, 0) end
  local sc = chunk()
  if type(sc) ~= "table" then error("scenario " .. path .. " must return a table", 0) end
  if type(sc.user) ~= "function" then error("scenario " .. path .. ": 'user' must be a function", 0) end
  local stages = sc.stages
  if not stages then
    local users, dur = sc.users or 1, fmt.duration(sc.duration or "10s")
    if not dur then error("scenario: bad duration", 0) end
    stages = { { duration = 0, target = users }, { duration = dur, target = users } }
  end
  local norm = {}
  for i, st in ipairs(stages) do
    local d = fmt.duration(st.duration)
    if not d or type(st.target) ~= "number" or st.target < 0 then
      error(("scenario: stage %d needs a duration and a target >= 0"):format(i), 0)
    end
    norm[i] = { duration = d, target = st.target }
  end
  sc.stages = norm
  if sc.thresholds ~= nil and type(sc.thresholds) ~= "table" then
    error("scenario " .. path .. ": 'thresholds' must be a list", 0)
  end
  for _, expr in ipairs(sc.thresholds or {}) do
    local t, terr = M.parse_threshold(expr)
    if not t then error("scenario " .. path .. ": " .. terr, 0) end
  end
  return sc
end

function M.total_duration(stages)
  local d = 0
  for _, st in ipairs(stages) do d = d + st.duration end
  return d
end

-- This thread's share of a target: threads split users as evenly as they can.
local function share(target, thread, threads)
  local base = math.floor(target / threads)
  local rest = math.floor(target) - base * threads
  return base + (thread <= rest and 1 or 0)
end

-- A distributed run's interval snapshots (bench/agent.lua): once a second, what this thread
-- recorded in that second (each trend's second histogram, counter and check deltas, user
-- errors) goes to the run's stream, so a lost agent's figures survive it. `h` is the
-- second's http_req_duration (the coordinator's live line) and `n` its http_reqs.
local function interval_reporter(cfg, rt)
  local push = require("moonwire.bench.agent").sender(cfg.report)
  local seq, last_counters, last_checks, last_errors = 0, {}, {}, 0
  local empty = core.histogram():encode()
  return function()
    seq = seq + 1
    local reg = bench._registry()
    local trends, counters, checks = {}, {}, {}
    for name, t in pairs(reg.trends) do
      trends[name] = t.sec:encode()
      t.sec:reset()
    end
    for name, c in pairs(reg.counters) do
      counters[name] = c.value - (last_counters[name] or 0)
      last_counters[name] = c.value
    end
    for name, c in pairs(reg.checks) do
      local l = last_checks[name] or { pass = 0, fail = 0 }
      checks[name] = { pass = c.pass - l.pass, fail = c.fail - l.fail, rate = c.rate }
      last_checks[name] = { pass = c.pass, fail = c.fail }
    end
    local order = {}
    for i, name in ipairs(reg.order) do order[i] = name end
    local sc = { trends = trends, counters = counters, checks = checks, order = order,
      errors = rt.errors - last_errors, first_error = rt.first_error, max_users = rt.max_users }
    last_errors = rt.errors
    push({ th = cfg.report.thread, seq = seq, t = (hrtime() - rt.t_start) / 1e9, n = counters.http_reqs or 0,
      bytes = 0, errors = {}, sc = sc }, trends.http_req_duration or empty)
  end
end

local function run_users(cfg, sc)
  bench._reset{ source = cfg.source, per_second = cfg.report ~= nil }
  local rt = { active = 0, stop = false, vus = {}, errors = 0, first_error = nil, max_users = 0 }
  local data = cfg.data
  local iterations = bench.counter("iterations")
  local iter_dur = bench.trend("iteration_duration")
  -- A user runs its iterations back to back, but never holds the loop: an iteration that
  -- gave the loop no turn (the cached clock did not move: no I/O, no sleep) is followed by a
  -- yield, else a user that never yields (or raises at once) would starve the stage loop,
  -- and the run would never end. After an error the user backs off (10 ms, doubling up to
  -- 0.5 s, reset by an iteration that succeeds): a failing user costs little CPU.
  local function vu_loop(vu)
    local backoff = 0
    while not rt.stop and vu.id <= rt.active do
      local t0, turn = hrtime(), mw.now()
      local ok, err = pcall(sc.user, vu, data)
      iterations:add(1)
      iter_dur:add((hrtime() - t0) / 1e6)
      vu.iteration = vu.iteration + 1
      if ok then
        backoff = 0
        if mw.now() == turn then mw.yield() end
      else
        rt.errors = rt.errors + 1
        rt.first_error = rt.first_error or tostring(err)
        backoff = math.min(0.5, backoff > 0 and backoff * 2 or 0.01)
        mw.sleep(backoff)
      end
    end
    vu.running = false
  end
  -- a distributed run (bench/agent.lua): an agreed start instant and a stop cell
  local shared = cfg.counters and core.counters_attach(cfg.counters, cfg.stop_cell)
  local function stopped() return shared and shared:get(cfg.stop_cell) ~= 0 end
  mw.run(function()
    if cfg.start_at then require("moonwire.bench.engine").wait_until(cfg.start_at) end
    local prev = 0
    local t_start = hrtime()
    rt.t_start = t_start
    if cfg.report then
      local report = interval_reporter(cfg, rt)
      mw.spawn(function()
        local k = 0
        while true do
          k = k + 1
          require("moonwire.bench.engine").wait_until(t_start + k * 1000000000)
          report()
        end
      end)
    end
    for _, st in ipairs(sc.stages) do
      if stopped() then break end
      local from, to = share(prev, cfg.thread_id, cfg.threads), share(st.target, cfg.thread_id, cfg.threads)
      local t0 = hrtime()
      repeat
        local elapsed = (hrtime() - t0) / 1e9
        local f = st.duration > 0 and math.min(1, elapsed / st.duration) or 1
        rt.active = math.floor(from + (to - from) * f + 0.5)
        if rt.active > rt.max_users then rt.max_users = rt.active end
        for id = 1, rt.active do
          local vu = rt.vus[id]
          if not vu then
            vu = { id = id, iteration = 0, thread = cfg.thread_id, source = cfg.source }
            rt.vus[id] = vu
          end
          if not vu.running then
            vu.running = true
            mw.spawn(vu_loop, vu)
          end
        end
        if f >= 1 or stopped() then break end
        -- (a tenth of a second between ramp steps, but never past the stage's end: a stage of
        -- 550 ms must not last 600)
        mw.sleep(math.max(0, math.min(0.1, st.duration - (hrtime() - t0) / 1e9)))
      until false
      prev = st.target
    end
    rt.stop = true
    -- the run's duration is the stages' (rates are per second of it); running iterations
    -- then get up to 10 s to finish (what they record counts), and the loop ends
    rt.duration = (hrtime() - t_start) / 1e9
    local deadline = hrtime() + 10e9
    while hrtime() < deadline do
      local busy = false
      for _, vu in pairs(rt.vus) do if vu.running then busy = true break end end
      if not busy then break end
      mw.sleep(0.05)
    end
    mw.stop()
  end)
  local reg = bench._registry()
  local out = { trends = {}, counters = {}, checks = reg.checks, order = reg.order, errors = rt.errors,
    first_error = rt.first_error, duration = rt.duration or 0, max_users = rt.max_users, t_start = rt.t_start }
  for name, t in pairs(reg.trends) do out.trends[name] = t.h:encode() end
  for name, c in pairs(reg.counters) do out.counters[name] = c.value end
  return out
end

--- Entry point of a scenario bench thread.
function M.thread_main(arg)
  local cfg = serial.decode(arg)
  local sc = M.load(cfg.scenario)
  return serial.encode(run_users(cfg, sc))
end

--- Merges the threads' results into { metrics = name -> summary, checks, ... }.
function M.merge(results)
  local trends, counters, checks, order, seen = {}, {}, {}, {}, {}
  local duration, errors, first_error, max_users = 0, 0, nil, 0
  for _, r in ipairs(results) do
    for _, name in ipairs(r.order) do
      if not seen[name] then seen[name] = true order[#order + 1] = name end
    end
    for name, enc in pairs(r.trends) do
      local h = core.histogram_decode(enc)
      if trends[name] then trends[name]:merge(h) else trends[name] = h end
    end
    for name, v in pairs(r.counters) do counters[name] = (counters[name] or 0) + v end
    for name, c in pairs(r.checks) do
      local m = checks[name] or { pass = 0, fail = 0, rate = c.rate }
      m.pass, m.fail = m.pass + c.pass, m.fail + c.fail
      checks[name] = m
    end
    if r.duration > duration then duration = r.duration end
    errors = errors + r.errors
    first_error = first_error or r.first_error
    max_users = max_users + r.max_users
  end
  local metrics = {}
  for name, h in pairs(trends) do
    local count, min, max, mean = h:stats()
    metrics[name] = { kind = "trend", count = count, min = min / 1000, max = max / 1000, avg = mean / 1000,
      med = h:percentile(50) / 1000, p50 = h:percentile(50) / 1000, p90 = h:percentile(90) / 1000,
      p95 = h:percentile(95) / 1000, p99 = h:percentile(99) / 1000, p99_9 = h:percentile(99.9) / 1000,
      _h = h }
  end
  for name, v in pairs(counters) do
    metrics[name] = { kind = "counter", value = v, rate = duration > 0 and v / duration or 0 }
  end
  return { metrics = metrics, checks = checks, order = order, duration = duration, errors = errors,
    first_error = first_error, max_users = max_users }
end

--- The JSON document of a scenario run (one process or distributed) with `threads` threads;
-- `merged` as M.merge returns it, with its threshold_results.
function M.json_doc(o, merged, threads)
  local json = require "moonwire.bench.json"
  local metrics = {}
  for name, m in pairs(merged.metrics) do
    local c = {}
    for k, v in pairs(m) do if k ~= "_h" then c[k] = v end end
    metrics[name] = c
  end
  return { scenario = o.scenario, threads = threads, duration_s = merged.duration, max_users = merged.max_users,
    metrics = metrics, checks = merged.checks, user_errors = merged.errors,
    first_error = merged.first_error or json.null, thresholds = json.array(merged.threshold_results or {}) }
end

--- What report.html reads of a scenario run: bench.http's requests (http_reqs) and their
-- failures (http_req_failed), the metrics and checks, the users' errors; `planned`, the
-- stages' duration (seconds).
function M.html_result(merged, planned)
  local reqs = merged.metrics.http_reqs
  local n = reqs and reqs.value or 0
  local failed = merged.checks.http_req_failed
  return { scenario = true, metrics = merged.metrics, checks = merged.checks,
    threshold_results = merged.threshold_results, duration_us = merged.duration * 1e6, max_users = merged.max_users,
    planned_duration = planned,
    requests_total = n, rps = merged.duration > 0 and n / merged.duration or 0,
    failed_requests = failed and failed.pass or 0, user_errors = merged.errors, first_error = merged.first_error,
    timeline = {} }
end

local function dots(name) return name .. (" "):rep(math.max(1, 30 - #name)):gsub(" ", ".") end

--- k6-style summary lines.
function M.print(r, out)
  local names = {}
  for name in pairs(r.checks) do if name ~= "http_req_failed" then names[#names + 1] = name end end
  table.sort(names)
  local pass, fail = 0, 0
  for _, name in ipairs(names) do
    local c = r.checks[name]
    pass, fail = pass + c.pass, fail + c.fail
    out:write(("  %s %s  ✓ %d ✗ %d\n"):format(c.fail == 0 and "✓" or "✗", name, c.pass, c.fail))
  end
  if #names > 0 then
    out:write(("  %s: %.2f%% ✓ %d ✗ %d\n"):format(dots("checks"), 100 * pass / math.max(1, pass + fail), pass, fail))
  end
  local f = r.checks.http_req_failed
  if f then
    out:write(("  %s: %.2f%% ✓ %d ✗ %d\n"):format(dots("http_req_failed"), 100 * f.pass / math.max(1, f.pass + f.fail),
      f.pass, f.fail))
  end
  local order = {}
  for _, n in ipairs(r.order) do order[#order + 1] = n end
  table.sort(order)
  for _, name in ipairs(order) do
    local m = r.metrics[name]
    if m and m.kind == "trend" then
      out:write(("  %s: avg=%.2f min=%.2f med=%.2f max=%.2f p(90)=%.2f p(95)=%.2f p(99)=%.2f\n"):format(dots(name),
        m.avg, m.min, m.med, m.max, m.p90, m.p95, m.p99))
    elseif m then
      -- (a counter may add fractions: %d would raise on them)
      local v = math.tointeger(m.value) or ("%.6g"):format(m.value)
      out:write(("  %s: %s  %.2f/s\n"):format(dots(name), v, m.rate))
    end
  end
  if r.errors > 0 then
    out:write(("  user errors: %d (first: %s)\n"):format(r.errors, r.first_error))
  end
end

-- Thresholds: 'metric.stat<value'. A metric's kind (trend, counter, check) is known for the
-- built-ins before the run, for the scenario's own metrics only after it; the statistics and
-- values each kind takes:
local KINDS = {
  trend = { stats = { avg = true, min = true, max = true, med = true, count = true }, percentiles = true },
  counter = { stats = { value = true, rate = true } },
  check = { stats = { rate = true } },
}
local BUILTIN = { http_req_duration = "trend", iteration_duration = "trend", http_reqs = "counter",
  iterations = "counter", http_req_failed = "check", checks = "check" }

-- The limit of threshold `t` for a metric of `kind` -> number, or nil, why not.
-- Trends: a time ("50ms", "1s"; a bare number is the trend's own unit, ms for durations);
-- counters: a count ("1k", "2M"); checks: a share ("99%", or 99).
local function limit_for(kind, t)
  local k = KINDS[kind]
  local stat = t.stat
  if stat and not k.stats[stat] and not (k.percentiles and t.p) then
    return nil, ("a %s has no statistic '%s'"):format(kind, stat)
  end
  local val = t.val
  if kind == "check" then
    return tonumber(val:match("^([%d.]+)%s*%%$") or val) or nil, "a share (99%) expected"
  elseif kind == "counter" or stat == "count" then
    -- (a rate per second takes SI suffixes as any count: 'pages.rate>1k', as 'rps>1k')
    if stat == "rate" then return fmt.count(val) or nil, "a number per second (10, 2.5, 1k) expected" end
    return fmt.count(val) or nil, "a count (1000, 1k, 2M) expected"
  end
  local secs = fmt.threshold_time(val)
  return secs and secs * 1000 or nil, "a time (50ms, 1s) or a number expected"
end

--- Parses 'metric.stat<value' (trend), 'metric>value' (counter), 'checks>99%' (rate)
-- -> { name, stat, p, op, val } or nil, message. Run when a scenario loads and on the
-- command line's --threshold: a threshold that cannot be judged is refused before the run.
function M.parse_threshold(expr)
  if type(expr) ~= "string" then return nil, "a threshold must be a string" end
  -- (a check's name is the name given to bench.check: "status is 200>99%")
  local lhs, op, val = expr:match("^%s*([^<>]-)%s*([<>]=?)%s*(.-)%s*$")
  if not lhs or lhs == "" or val == "" then return nil, "cannot parse threshold '" .. expr .. "'" end
  local name, stat = lhs:match("^([%w_]+)%.(%w[%w_.]*)$")
  local t = { name = name or lhs, stat = stat, op = op, val = val }
  if stat and stat:match("^p") then
    t.p = fmt.rank(stat:sub(2))
    if not t.p then
      return nil, "bad percentile in threshold '" .. expr .. "' (p50, p99.9: above 0, at most 100)"
    end
  end
  -- a built-in's kind is known; another metric's is one of the kinds that take the statistic
  -- and the value
  local kinds = BUILTIN[t.name] and { BUILTIN[t.name] } or { "trend", "counter", "check" }
  local why
  for _, kind in ipairs(kinds) do
    local limit, err = limit_for(kind, t)
    if limit then return t end
    why = why or err
  end
  return nil, ("bad threshold '%s' (%s)"):format(expr, why)
end

--- Judges threshold `expr` on merged results `r` -> ok, message.
function M.check_threshold(expr, r)
  local t, perr = M.parse_threshold(expr)
  if not t then return false, perr end
  local name = t.name
  local actual, limit, lerr
  if name == "checks" or (r.checks[name] and not r.metrics[name]) then
    local pass, fail = 0, 0
    if name == "checks" then
      for n, c in pairs(r.checks) do if n ~= "http_req_failed" then pass, fail = pass + c.pass, fail + c.fail end end
    else
      pass, fail = r.checks[name].pass, r.checks[name].fail
    end
    actual = 100 * pass / math.max(1, pass + fail)
    limit, lerr = limit_for("check", t)
  else
    local m = r.metrics[name]
    -- (a FAIL line as any other: the run recorded nothing under that name)
    if not m then return false, ("FAIL %s (no metric '%s' was recorded)"):format(expr, name) end
    limit, lerr = limit_for(m.kind, t)
    if limit and m.kind == "trend" then
      -- a trend with no value recorded has no statistic (not 0): the threshold fails
      if m.count == 0 then return false, ("FAIL %s (no samples)"):format(expr) end
      if t.p then actual = m._h:percentile(t.p) / 1000
      else actual = m[t.stat or "avg"] end
    elseif limit then
      actual = t.stat == "rate" and m.rate or m.value
    end
  end
  if not limit then return false, ("FAIL %s (%s)"):format(expr, lerr) end
  local ok = require("moonwire.bench.cli").compare(t.op, actual, limit)
  return ok, ("%s %s (actual %.3f)"):format(ok and "PASS" or "FAIL", expr, actual)
end

return M
