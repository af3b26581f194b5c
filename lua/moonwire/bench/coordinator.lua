--- `moonwire bench --agents N --via redis://... URL`: one test over N agents. Waits for the
-- agents' heartbeats, splits the threads in proportion to the capacity each announces (the
-- connections and the rate follow the threads exactly as in one process with that many
-- threads), runs a wrk script's setup() or a scenario's setup once and ships the results,
-- starts everyone at Redis TIME + a margin, reads the run's stream (interval snapshots for
-- the live line; then each agent's exact per-thread results, acknowledged), watches the
-- agents' heartbeats (lost: its intervals are kept), and prints one report: wrk's text,
-- --json, --html, with a row per agent beside the merged figures.
local mw = require "moonwire"
local core = require "moonwire.core"
local url = require "moonwire.url"
local serial = require "moonwire.bench.serial"
local dist = require "moonwire.bench.dist"
local fmt = require "moonwire.bench.format"
local cli = require "moonwire.bench.cli"
local wrkenv = require "moonwire.bench.wrk"

local key = dist.key

local M = {}

local START_MARGIN_US = 500000

-- one line, as in one process (bench/cli.lua): an error raised in the loop comes with the
-- traceback of where moonwire caught it, which says nothing to the user
local function die(msg)
  msg = tostring(msg):gsub("\n?stack traceback:.*$", "")
  io.stderr:write("moonwire bench: ", msg, "\n")
  return 2
end

local function readfile(path)
  local f, err = io.open(path, "rb")
  if not f then error(err, 0) end
  local s = f:read("a")
  f:close()
  return s
end

-- Waits until n agents are idle; -> sorted list of their infos. interrupted(): Ctrl-C.
local function wait_agents(link, n, limit, interrupted)
  local deadline = mw.now() + limit
  local seen = {}
  while true do
    if interrupted() then error("interrupted while waiting for the agents", 0) end
    local names = link:call("ZRANGE", key("agents"), 0, -1)
    if names and #names > 0 then
      local keys = {}
      for i, name in ipairs(names) do keys[i] = key("agent", name) end
      local infos = link:call("MGET", table.unpack(keys))
      local idle = {}
      seen = {}
      if infos then
        for i, s in ipairs(infos) do
          if s == dist.null then
            link:call("ZREM", key("agents"), names[i])   -- its heartbeat expired: gone
          else
            local ok, info = pcall(serial.decode, s)
            if ok and type(info) == "table" then
              seen[#seen + 1] = info.name .. (info.state == "idle" and "" or " (busy)")
              if info.state == "idle" then idle[#idle + 1] = info end
            end
          end
        end
      end
      if #idle >= n then
        table.sort(idle, function(a, b) return a.name < b.name end)
        local out = {}
        for i = 1, n do out[i] = idle[i] end
        return out
      end
    end
    if mw.now() > deadline then
      error(("only %d of %d agents present after %gs%s"):format(#seen, n, limit,
        #seen > 0 and (": " .. table.concat(seen, ", ")) or ""), 0)
    end
    mw.sleep(0.2)
  end
end

-- The fields of a stream entry ({ k1, v1, k2, v2, ... }) as a table.
local function fields(list)
  local t = {}
  for i = 1, #list - 1, 2 do t[list[i]] = list[i + 1] end
  return t
end

-- ---------------------------------------------------------------------------------------
-- what agents send, checked before use: a malformed event is ignored (an interval) or
-- makes its agent lost (a final), it never stops the coordinator

local function num(v) return type(v) == "number" end
local function hist(v) return type(v) == "string" and pcall(core.histogram_decode, v) end
local function map_of(t, check)
  if type(t) ~= "table" then return false end
  for k, v in pairs(t) do if not check(v, k) then return false end end
  return true
end
local ERROR_KINDS = { connect = true, read = true, write = true, status = true, timeout = true }
local function errors_ok(t) return map_of(t, function(v, k) return num(v) and ERROR_KINDS[k] end) end
local function num_map(t) return map_of(t, num) end
local function checks_ok(t)
  return map_of(t, function(c)
    return type(c) == "table" and num(c.pass) and num(c.fail) and (c.rate == nil or type(c.rate) == "boolean")
  end)
end
local function sc_ok(sc)
  return type(sc) == "table" and map_of(sc.trends, hist) and num_map(sc.counters) and checks_ok(sc.checks)
    and map_of(sc.order, function(v) return type(v) == "string" end) and num(sc.errors) and num(sc.max_users)
end

-- Why an interval snapshot (d, h) cannot be used (nil: it can).
local function bad_interval(d, h, scenario, gs)
  if type(d) ~= "table" or not gs[d.th] or math.type(d.seq) ~= "integer" then return "no thread of its own or seq" end
  if not (num(d.t) and num(d.n) and num(d.bytes) and errors_ok(d.errors)) then return "bad counts" end
  if not hist(h) then return "bad histogram" end
  if d.st ~= nil and not num_map(d.st) then return "bad statuses" end
  if d.rq ~= nil and not hist(d.rq) then return "bad Req/Sec histogram" end
  if scenario and d.sc ~= nil and not sc_ok(d.sc) then return "bad scenario metrics" end
end

local function timeline_ok(tl)
  return map_of(tl, function(e)
    return type(e) == "table" and num(e.t) and num(e.rps) and num(e.p50) and num(e.p99) and num(e.max)
      and num(e.errors)
  end)
end

-- Why a final message cannot be used (nil: it can); gs: the agent's thread numbers.
local function opt(v, check) return v == nil or check(v) end
local function int(v) return math.type(v) == "integer" end
local function str(v) return type(v) == "string" end

local function bad_final(d, scenario, gs)
  if type(d) ~= "table" or type(d.results) ~= "table" then return "no results" end
  if not map_of(d.failures, function(f) return type(f) == "string" end) then return "bad failures" end
  -- (what the report prints and sums: a wrong type would raise there, after the run)
  if not (opt(d.stopped, str) and opt(d.offset, num) and opt(d.rtt, num)) then return "bad run facts" end
  for _, r in pairs(d.results) do
    if type(r) ~= "table" or not gs[r.g] then return "a result of no thread of its own" end
    if not (opt(r.started_us, int) and opt(r.mono_start_ns, int)) then return "bad start times" end
    if scenario and not opt(r.first_error, str) then return "a bad scenario error" end
    if scenario then
      if not (sc_ok(r) and num(r.duration)) then return "a bad scenario result" end
    else
      if not (num(r.count) and num(r.bytes) and num(r.duration_us) and num(r.hung) and errors_ok(r.errors)
        and num_map(r.statuses) and timeline_ok(r.timeline) and hist(r.latency) and hist(r.requests)) then
        return "a bad thread result"
      end
      local h2 = r.h2
      if h2 ~= nil and not (type(h2) == "table" and num(h2.streams) and num(h2.reconnects)
        and num(h2.refused_retries) and num_map(h2.rst) and num_map(h2.goaway) and hist(h2.ttfb)) then
        return "bad HTTP/2 figures"
      end
    end
  end
end

-- A lost agent's result, rebuilt from the interval snapshots that reached us: one pseudo
-- thread result per thread, in the shape engine.run returns, whose parts (status counts,
-- the per-second timeline, Req/Sec) cover the same requests as its totals.
local function from_intervals(ag)
  local out = {}
  for g, th in pairs(ag.intervals) do
    local lat = core.histogram()
    local n, bytes, t = 0, 0, 0
    local errors = { connect = 0, read = 0, write = 0, status = 0, timeout = 0 }
    local statuses, timeline = {}, {}
    local seqs = {}
    for seq in pairs(th) do seqs[#seqs + 1] = seq end
    table.sort(seqs)
    local prev_t, rq = 0, nil
    for _, seq in ipairs(seqs) do
      local iv = th[seq]
      local h = core.histogram_decode(iv.h)
      lat:merge(h)
      n, bytes = n + iv.d.n, bytes + iv.d.bytes
      if iv.d.t > t then t = iv.d.t end
      local errs = 0
      for k, v in pairs(iv.d.errors) do
        errors[k] = (errors[k] or 0) + v
        errs = errs + v
      end
      for k, v in pairs(iv.d.st or {}) do statuses[k] = (statuses[k] or 0) + v end
      local dt = iv.d.t - prev_t
      timeline[#timeline + 1] = { t = iv.d.t, rps = dt > 0 and iv.d.n / dt or 0, p50 = h:percentile(50),
        p99 = h:percentile(99), max = select(3, h:stats()), errors = errs }
      prev_t = iv.d.t
      rq = iv.d.rq or rq
    end
    out[#out + 1] = { g = g, latency = lat:encode(), requests = rq or core.histogram():encode(), count = n,
      bytes = bytes, errors = errors, statuses = statuses, duration_us = math.floor(t * 1e6), timeline = timeline,
      hung = 0 }
  end
  table.sort(out, function(a, b) return a.g < b.g end)
  return out
end

-- The same for a scenario agent: one pseudo thread result per thread in the shape
-- scenario.lua's run_users returns, summed from its per-second snapshots (d.sc).
local function scenario_from_intervals(ag)
  local out = {}
  for g, th in pairs(ag.intervals) do
    local trends, counters, checks = {}, {}, {}
    local r = { g = g, trends = {}, counters = counters, checks = checks, order = {}, errors = 0, duration = 0,
      max_users = 0 }
    for _, iv in pairs(th) do
      local s = iv.d.sc
      if s then
        for name, enc in pairs(s.trends) do
          local h = core.histogram_decode(enc)
          if trends[name] then trends[name]:merge(h) else trends[name] = h end
        end
        for name, v in pairs(s.counters) do counters[name] = (counters[name] or 0) + v end
        for name, c in pairs(s.checks) do
          local m = checks[name] or { pass = 0, fail = 0, rate = c.rate }
          m.pass, m.fail = m.pass + c.pass, m.fail + c.fail
          checks[name] = m
        end
        if #s.order > #r.order then r.order = s.order end   -- names only grow
        r.errors = r.errors + s.errors
        r.first_error = r.first_error or s.first_error
        if s.max_users > r.max_users then r.max_users = s.max_users end
        if iv.d.t > r.duration then r.duration = iv.d.t end
      end
    end
    for name, h in pairs(trends) do r.trends[name] = h:encode() end
    out[#out + 1] = r
  end
  table.sort(out, function(a, b) return a.g < b.g end)
  return out
end

-- Reads the heartbeats of the agents for which owes(ag) holds; -> a list of { ag, why }:
-- "gone" (its key expired) or "dropped" (it had taken this run's job, as its heartbeat
-- said, and now says idle or another run: it gave the job up without delivering).
local function check_heartbeats(link, state, run, owes)
  local list, keys = {}, {}
  for _, ag in pairs(state) do
    if owes(ag) then list[#list + 1] = ag keys[#keys + 1] = key("agent", ag.name) end
  end
  local v = #keys > 0 and link:call("MGET", table.unpack(keys))
  local out = {}
  if not v then return out end
  local now = mw.now()
  for i, ag in ipairs(list) do
    if v[i] == dist.null then
      if dist.gone(link) then out[#out + 1] = { ag = ag, why = "gone" } end
    else
      -- when it last beat: the key was set TTL - PTTL ago
      local pttl = link:call("PTTL", keys[i])
      ag.last_beat = math.tointeger(pttl) and pttl >= 0 and now - (dist.TTL * 1000 - pttl) / 1000 or now
      local ok, info = pcall(serial.decode, v[i])
      if ok and type(info) == "table" then
        if info.run == run then ag.took = true
        elseif ag.took then out[#out + 1] = { ag = ag, why = "dropped" } end
      end
    end
  end
  return out
end

local function agents_text(rows, out)
  out:write("  Agents:\n")
  out:write(("    %-24s %7s %6s %10s %11s %9s %9s %7s  %s\n"):format("name", "threads", "conns", "requests",
    "req/s", "p50", "p99", "errors", "state"))
  for _, a in ipairs(rows) do
    out:write(("    %-24s %7d %6s %10d %11.2f %9s %9s %7d  %s\n"):format(a.name, a.threads,
      a.connections and tostring(a.connections) or "-", a.requests, a.rps, fmt.time_us(a.p50), fmt.time_us(a.p99),
      a.errors, a.state))
  end
end

--- Runs the coordinator; returns the exit status.
function M.main(o)
  local scenario_mod = o.scenario and require "moonwire.bench.scenario"
  local sc
  if o.scenario then
    local ok, s = pcall(scenario_mod.load, o.scenario)
    if not ok then return die(s) end
    sc = s
  else
    if not o.url then return die("a URL is required") end
    local target, uerr = url.parse(o.url)
    if not target then return die(uerr) end
    if target.scheme ~= "http" and target.scheme ~= "https" then return die("unsupported scheme " .. target.scheme) end
  end
  local out = o.json == "-" and io.stderr or io.stdout
  local code, report = 0, nil
  local run_ok, run_err = pcall(mw.run, function()
    -- Ctrl-C, as in one process: the agents are told to stop at once (the run's stop key),
    -- their final results are collected and the report (and the JSON) covers what ran.
    -- Before the start there is nothing to report: the agents are released, exit 2.
    local interrupted = false
    mw.signal("SIGINT", function() interrupted = true end)
    local _sigint <close> = setmetatable({}, { __close = function() mw.signal("SIGINT", nil) end })
    local function is_interrupted() return interrupted end
    local link, blk = dist.link(o.via), dist.link(o.via, dist.BLOCK_TIMEOUT)
    local c, cerr = link:conn()
    if not c then error("cannot connect to " .. o.via .. ": " .. tostring(cerr), 0) end
    local agents = wait_agents(link, o.agents, o.agent_wait or 30, is_interrupted)
    local caps = {}
    for i, a in ipairs(agents) do caps[i] = math.max(1, math.floor(tonumber(a.threads) or 1)) end
    local T = 0
    for _, cap in ipairs(caps) do T = T + cap end
    if o.threads_given then T = math.max(o.threads, #agents) end
    if not o.scenario and o.connections < T then
      error(("number of connections (%d) must be >= threads (%d over %d agents)"):format(o.connections, T, #agents), 0)
    end
    local split = dist.split_threads(T, caps)
    local run = link:call("INCR", key("runs"))
    if not run then error("Redis: cannot start a run", 0) end
    local function K(...) return key("run", run, ...) end

    -- what every agent needs
    local job = { run = run, T = T, kind = o.scenario and "scenario" or "http" }
    local main_env
    local sets, thread_objs = {}, {}
    if o.scenario then
      job.scenario_src = readfile(o.scenario)
      job.data = sc.setup and sc.setup() or nil
    else
      local target = assert(url.parse(o.url))
      target.port_given = o.url:match("^%a+://[^/]*:(%d+)") and target.port or nil
      local main_wrk
      main_env, main_wrk = wrkenv.env(target, o.headers, nil)
      main_wrk.method = o.method or "GET"
      main_wrk.body = o.body
      if o.script then
        job.script_src = readfile(o.script)
        wrkenv.load(o.script, main_env)
        local conflict = cli.script_conflict(o, main_env)
        if conflict then error(conflict, 0) end
      end
      if main_env.setup then   -- setup(thread) once per thread of the whole test, here
        local addrs = mw.resolve(target.host, target.port) or {}
        for g = 1, T do
          local vals = {}
          local th = { id = g, addr = addrs[1] and setmetatable({ host = addrs[1].host, port = addrs[1].port },
            wrkenv.Addr) }
          -- after the run, the thread's globals as its agent sent them back (th.final: a
          -- global the script set to nil is nil, as in wrk); what setup() set stays visible
          -- only for a thread whose agent was lost
          function th.get(_, name)
            if th.final then return th.final[name] end
            return vals[name]
          end
          function th.set(_, name, v) vals[name] = v end
          function th.stop() end
          main_env.setup(th)
          sets[g], thread_objs[g] = vals, th
        end
      end
      job.o = { url = o.url, headers = o.headers, duration = o.duration, timeout = o.timeout,
        pipeline = o.pipeline, method = o.method or main_wrk.method, body = o.body or main_wrk.body,
        script_args = o.script_args, verify = o.verify }
    end

    -- the coordinator's heartbeat: agents stop their load when it disappears
    local finished = false
    mw.spawn(function()
      while not finished do
        link:call("SET", K("coord"), "1", "PX", math.floor(dist.TTL * 1000))
        mw.sleep(dist.HEARTBEAT)
      end
    end)

    -- jobs
    local now_us = dist.redis_time(link)
    if not now_us then error("Redis: TIME failed", 0) end
    local state, g = {}, 0
    for i, a in ipairs(agents) do
      local threads = {}
      for _ = 1, split[i] do
        g = g + 1
        threads[#threads + 1] = { g = g, set = sets[g],
          conns = not o.scenario and dist.conns_of(g, T, o.connections) or nil,
          rate = o.rate and o.rate / T or nil }
      end
      job.threads, job.deadline_us = threads, now_us + dist.BARRIER * 1e6
      local conns = 0
      for _, th in ipairs(threads) do conns = conns + (th.conns or 0) end
      local gs = {}
      for _, th in ipairs(threads) do gs[th.g] = true end
      state[a.name] = { name = a.name, threads = #threads, connections = not o.scenario and conns or nil,
        intervals = {}, last_beat = mw.now(), order = i, gs = gs }
      link:call("LPUSH", key("agent", a.name, "jobs"), serial.encode(job))
    end

    -- the barrier: every agent ready (prepared, clock measured), then one start instant
    local last_id = "0"
    local function read_events(block_ms, handle)
      local r = blk:call("XREAD", "COUNT", 1000, "BLOCK", block_ms, "STREAMS", K("events"), last_id)
      if not r then
        if not blk.c then mw.sleep(0.1) end
        return
      end
      if r == dist.null then return end
      for _, stream in ipairs(r) do
        for _, entry in ipairs(stream[2]) do
          last_id = entry[1]
          local f = fields(entry[2])
          local ag = state[f.a]
          if ag then
            local ok, d = pcall(serial.decode, f.d)
            if ok then
              handle(ag, f.k, d, f)
            elseif not ag.warned then
              ag.warned = true
              io.stderr:write(("moonwire bench: agent %s: malformed event ignored: %s\n"):format(ag.name, tostring(d)))
            end
          end
        end
      end
    end
    local ready, errors_ = 0, {}
    local barrier_deadline = mw.now() + dist.BARRIER
    local barrier_check = mw.now()
    while ready + #errors_ < #agents do
      if interrupted then
        link:call("SET", K("stop"), "1", "EX", 60)
        for name in pairs(state) do link:call("LPUSH", K("go", name), "abort") end
        error("interrupted before the start", 0)
      end
      if mw.now() > barrier_deadline then
        link:call("SET", K("stop"), "1", "EX", 60)
        local missing = {}
        for name, ag in pairs(state) do if not ag.ready then missing[#missing + 1] = name end end
        table.sort(missing)
        error(("agents not ready after %gs: %s"):format(dist.BARRIER, table.concat(missing, ", ")), 0)
      end
      if mw.now() - barrier_check >= 0.5 then
        -- an agent that took the job and gave it up (or died) will never be ready
        barrier_check = mw.now()
        local bad = check_heartbeats(link, state, run, function(ag) return not ag.error end)
        if #bad > 0 then
          link:call("SET", K("stop"), "1", "EX", 60)
          for name in pairs(state) do link:call("LPUSH", K("go", name), "abort") end
          local why = {}
          for _, b in ipairs(bad) do
            why[#why + 1] = b.ag.name .. (b.why == "gone" and " is gone (no heartbeat)" or " dropped the job")
          end
          table.sort(why)
          error("agents cannot run the test: " .. table.concat(why, "; "), 0)
        end
      end
      read_events(200, function(ag, kind, d)
        if kind == "ready" and not ag.ready and type(d) == "table" then
          ag.ready, ag.offset, ag.rtt = true, d.offset, d.rtt
          ready = ready + 1
        elseif kind == "error" and not ag.error then
          ag.error = type(d) == "table" and d.error or "malformed error event"
          errors_[#errors_ + 1] = ag.name .. ": " .. tostring(ag.error)
        end
      end)
    end
    if #errors_ > 0 then
      link:call("SET", K("stop"), "1", "EX", 60)
      for name in pairs(state) do link:call("LPUSH", K("go", name), "abort") end
      error("agents cannot run the test: " .. table.concat(errors_, "; "), 0)
    end
    local t_us = dist.redis_time(link)
    if not t_us then error("Redis: TIME failed", 0) end
    local start_us = t_us + START_MARGIN_US
    for name in pairs(state) do
      link:call("LPUSH", K("go", name), tostring(start_us))
      link:call("EXPIRE", K("go", name), 60)
    end
    local duration = o.scenario and scenario_mod.total_duration(sc.stages) or o.duration
    out:write(("Running %s on %d agents (%d threads%s), %s\n"):format(o.scenario and ("scenario " .. o.scenario)
      or o.url, #agents, T, o.scenario and "" or (", " .. o.connections .. " connections"),
      fmt.time_us(duration * 1e6)))
    out:flush()

    -- collect: intervals (live line, kept for lost agents), finals (acknowledged), losses
    local t_start = mw.now() + START_MARGIN_US / 1e6
    local pending = #agents
    local stopping = false
    local progress = not o.quiet and core.isatty(1) and o.json ~= "-"
    local win_n, win_h, last_print = 0, core.histogram(), mw.now()
    local last_check = mw.now()
    local hard_deadline = t_start + duration + o.timeout + 30
    while pending > 0 do
      if interrupted and not stopping then
        stopping = true
        link:call("SET", K("stop"), "1", "EX", 60)
      end
      read_events(200, function(ag, kind, d, f)
        local why = kind == "interval" and bad_interval(d, f.h, o.scenario, ag.gs)
          or kind == "final" and bad_final(d, o.scenario, ag.gs)
        if why then
          if kind == "final" then
            link:call("LPUSH", K("ack", ag.name), "1")   -- (no use sending it again)
            link:call("EXPIRE", K("ack", ag.name), 60)
            if not ag.final and not ag.lost then
              ag.lost = true
              pending = pending - 1
              io.stderr:write(("moonwire bench: agent %s lost (malformed results: %s)\n"):format(ag.name, why))
            end
          elseif not ag.warned then
            ag.warned = true
            io.stderr:write(("moonwire bench: agent %s: malformed interval ignored: %s\n"):format(ag.name, why))
          end
        elseif kind == "interval" then
          ag.intervals[d.th] = ag.intervals[d.th] or {}
          if not ag.intervals[d.th][d.seq] then
            ag.intervals[d.th][d.seq] = { d = d, h = f.h }
            win_n = win_n + d.n
            win_h:merge(core.histogram_decode(f.h))
          end
        elseif kind == "final" then
          link:call("LPUSH", K("ack", ag.name), "1")
          link:call("EXPIRE", K("ack", ag.name), 60)
          if not ag.final and not ag.lost then
            ag.final = d
            pending = pending - 1
          end
        end
      end)
      local now = mw.now()
      if progress and now - last_print >= 1 then
        local lost = 0
        for _, ag in pairs(state) do if ag.lost then lost = lost + 1 end end
        io.stdout:write(("\r  %5.1fs  %10s req/s  p99 %s  agents %d/%d    "):format(math.max(0, now - t_start),
          fmt.metric(win_n / (now - last_print)), fmt.time_us(win_h:percentile(99)), #agents - lost, #agents))
        io.stdout:flush()
        win_n, last_print = 0, now
        win_h:reset()
      end
      if now - last_check >= 0.5 then
        last_check = now
        local bad = check_heartbeats(link, state, run, function(ag) return not ag.final and not ag.lost end)
        for _, b in ipairs(bad) do
          local ag = b.ag
          ag.lost = true
          pending = pending - 1
          if b.why == "gone" then
            io.stderr:write(("moonwire bench: agent %s lost (no heartbeat for %.1fs)\n"):format(ag.name,
              now - ag.last_beat))
          else
            io.stderr:write(("moonwire bench: agent %s lost (it dropped the job: idle again without results)\n"):format(
              ag.name))
          end
          if o.on_agent_loss == "stop" and not stopping then
            stopping = true
            link:call("SET", K("stop"), "1", "EX", 60)
          end
        end
        if now > hard_deadline then
          for name, ag in pairs(state) do
            if not ag.final and not ag.lost then
              ag.lost = true
              pending = pending - 1
              io.stderr:write(("moonwire bench: agent %s lost (no results in time)\n"):format(name))
            end
          end
        end
      end
    end
    finished = true
    if progress then io.stdout:write("\r", (" "):rep(70), "\r") end
    if interrupted then io.stderr:write("moonwire bench: interrupted: the report covers what ran\n") end
    link:call("DEL", K("events"), K("coord"))

    -- the report
    local all, failures = {}, {}
    local starts = {}
    local ordered = {}
    for _, ag in pairs(state) do ordered[#ordered + 1] = ag end
    table.sort(ordered, function(a, b) return a.order < b.order end)
    for _, ag in ipairs(ordered) do
      local results
      if ag.final then
        results = ag.final.results
        for _, f in ipairs(ag.final.failures) do failures[#failures + 1] = ag.name .. ": " .. f end
        local first, mono
        for _, r in ipairs(results) do
          if r.started_us and (not first or r.started_us < first) then first = r.started_us end
          if r.mono_start_ns and (not mono or r.mono_start_ns < mono) then mono = r.mono_start_ns end
        end
        ag.started_us, ag.mono_start_ns = first, mono
        if first then starts[#starts + 1] = first end
      else
        results = o.scenario and scenario_from_intervals(ag) or from_intervals(ag)
      end
      ag.results = results
      for _, r in ipairs(results) do all[#all + 1] = r end
    end
    table.sort(all, function(a, b) return a.g < b.g end)
    for _, r in ipairs(all) do
      if thread_objs[r.g] and type(r.globals) == "table" then thread_objs[r.g].final = r.globals end
    end
    local spread
    if #starts > 1 then
      table.sort(starts)
      spread = starts[#starts] - starts[1]
    end
    report = { agents = ordered, all = all, failures = failures, spread = spread, T = T, start_us = start_us }
    report.main_done = main_env and main_env.done
    if #failures > 0 and #all == 0 then error(table.concat(failures, "; "), 0) end
    if o.scenario then
      report.merged = scenario_mod.merge(all)
    else
      report.merged = cli.merge_results(all)
    end
  end)
  if not run_ok then return die(tostring(run_err)) end

  -- printing
  local o2 = setmetatable({ threads = report.T }, { __index = o })
  local merged = report.merged
  local rows = {}
  local lost = 0
  for _, ag in ipairs(report.agents) do
    local row = { name = ag.name, threads = ag.threads, connections = ag.connections,
      state = ag.lost and "lost" or (ag.final and ag.final.stopped and ("stopped: " .. ag.final.stopped) or "ok"),
      clock_offset_us = ag.final and ag.final.offset, rtt_us = ag.final and ag.final.rtt,
      start_skew_us = ag.started_us and (ag.started_us - report.start_us) or nil, mono_start_ns = ag.mono_start_ns }
    if ag.lost then lost = lost + 1 end
    if o.scenario then
      local m = scenario_mod.merge(ag.results)
      local d = m.metrics.http_req_duration
      row.result = m
      row.requests = m.metrics.http_reqs and m.metrics.http_reqs.value or 0
      row.rps = m.duration > 0 and row.requests / m.duration or 0
      row.p50, row.p99 = d and d.p50 * 1000 or 0, d and d.p99 * 1000 or 0
      row.errors = m.errors
      row.iterations = m.metrics.iterations and m.metrics.iterations.value or 0
    else
      local r = cli.merge_results(ag.results)
      row.result = r
      row.requests, row.rps, row.errors = r.requests_total, r.rps, r.errors_total
      row.p50, row.p99, row.max = r.latency:percentile(50), r.latency:percentile(99), r.latency.max
    end
    rows[#rows + 1] = row
  end
  local out2 = o.json == "-" and io.stderr or io.stdout
  local all_thresholds = o.scenario and cli.scenario_thresholds(sc, o) or o.thresholds
  local check = o.scenario and scenario_mod.check_threshold or cli.check_threshold
  if o.scenario then
    out2:write(("  max %d users, %.1fs\n"):format(merged.max_users, merged.duration))
    scenario_mod.print(merged, out2)
  else
    cli.print_wrk(o2, merged, out2)
  end
  local clamped = o.scenario and 0 or merged.latency._h:clamped()
  if clamped > 0 then
    out2:write(("  %d latencies above the histogram's range (2^41-1 us), counted in its top bucket\n"):format(clamped))
  end
  agents_text(rows, out2)
  if report.spread then out2:write(("  Start spread over agents: %s\n"):format(fmt.time_us(report.spread))) end
  for _, f in ipairs(report.failures) do out2:write("  failure: ", f, "\n") end
  if lost > 0 then
    out2:write(("  %d agent(s) lost: their figures hold the intervals received before\n"):format(lost))
    code = 1
  end
  if #report.failures > 0 then code = 1 end
  if not o.scenario then code = math.max(code, cli.call_done(report.main_done, merged)) end
  local tres, tcode = cli.judge(all_thresholds, merged, check, out2)
  code = math.max(code, tcode)
  for _, row in ipairs(rows) do row.thresholds = cli.judge(all_thresholds, row.result, check) end
  merged.threshold_results = tres
  local json = require "moonwire.bench.json"
  local function agent_docs()
    local list = {}
    for _, row in ipairs(rows) do
      list[#list + 1] = { name = row.name, threads = row.threads, connections = row.connections or json.null,
        requests = row.requests, rps = row.rps, errors = row.errors, state = row.state, lost = row.state == "lost",
        latency_us = { p50 = row.p50, p99 = row.p99 }, clock_offset_us = row.clock_offset_us or json.null,
        rtt_us = row.rtt_us or json.null, start_skew_us = row.start_skew_us or json.null,
        start_monotonic_ns = row.mono_start_ns or json.null,
        thresholds = json.array(row.thresholds or {}) }
    end
    return json.array(list)
  end
  local werr = cli.write_outputs(o, function()
    local doc
    if o.scenario then
      doc = scenario_mod.json_doc(o, merged, report.T)
    else
      doc = cli.json_doc(o2, merged)
      doc.out_of_range = clamped
    end
    doc.agents = agent_docs()
    doc.start_spread_us = report.spread or json.null
    return json.encode(doc)
  end, function()
    local r = o.scenario and scenario_mod.html_result(merged, scenario_mod.total_duration(sc.stages)) or merged
    r.agents = rows
    return require("moonwire.bench.report").html(o2, r)
  end)
  return werr or code
end

return M
