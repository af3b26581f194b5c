--- The load generator of one thread: its own event loop, C connections driven by one task
-- each, llhttp parsing the responses in C (status and size only unless the script has a
-- response() hook), latencies into an HDR histogram in microseconds. Open model (-R):
-- each connection sends on a schedule and latency counts from the scheduled time, so a
-- stalling server is not hidden (coordinated omission, as wrk2 corrects it).
local mw = require "moonwire"
local core = require "moonwire.core"
local serial = require "moonwire.bench.serial"
local wrkenv = require "moonwire.bench.wrk"

local hrtime, http_conn = core.hrtime, core.http_conn

local M = {}

local Response = {}
-- wrk hands response() the names as the server sent them: any case finds them here (the
-- HTTP/2 hooks path, bench/h2.lua, sets it too)
local headers_ci = { __index = function(t, k)
  if type(k) == "string" then return rawget(t, k:lower()) end
end }
M.headers_ci = headers_ci

local function connect(cfg)
  local opts = { timeout = cfg.timeout, local_host = cfg.source }
  if cfg.target.scheme == "https" then opts.tls = { insecure = not cfg.verify } end
  return mw.tcp.connect(cfg.addr.host, cfg.addr.port, opts)
end

-- Per-thread state shared by its connections.
local function new_state(cfg)
  return {
    cfg = cfg, stop = false,
    latency = core.histogram(), requests = core.histogram(), second = core.histogram(),
    count = 0, bytes = 0, inflight = 0, shared_count = 0, pending = {},
    errors = { connect = 0, read = 0, write = 0, status = 0, timeout = 0 },
    statuses = {}, timeline = {},
  }
end

-- A response answered once the run has ended (st.t_end: during the drain) is not one of the
-- run's requests: wrk stops counting at -d, and counting it would inflate Requests/sec over
-- a duration that ends before it. The drain only tells those answered from those hung.
local function record(st, status, latency_us, bytes)
  if st.t_end then return end
  st.count = st.count + 1
  st.bytes = st.bytes + (bytes or 0)
  if latency_us < 0 then latency_us = 0 end
  st.latency:record(latency_us)
  st.second:record(latency_us)
  if status then
    st.statuses[status] = (st.statuses[status] or 0) + 1
    if status > 399 then st.errors.status = st.errors.status + 1 end
  end
end

-- A script's hook (request, response, delay) that raises stops the run: the error is kept
-- for M.run to raise (the thread fails: "thread N failed: ..." and exit status 2, as an
-- init() error), the other threads are told through the shared stop cell.
local function hook_failed(st, err)
  st.hook_error = st.hook_error or err
  st.stop = true
  if st.shared then st.shared:set(st.stop_cell, 1) end
end

local function call_hook(st, fn, ...)
  local ok, a = xpcall(fn, debug.traceback, ...)
  if ok then return a end
  hook_failed(st, a)
end
-- (the HTTP/2 hooks path, bench/h2.lua, calls the hooks through these too)
M.hook_failed, M.call_hook = hook_failed, call_hook

--- -R: when the k-th of a thread's n schedules (connections, or HTTP/2 streams) sends first,
-- each sending once per `interval` ns. The schedules of all threads interleave (thread g's
-- k-th is the ((g - 1) + T * (k - 1))-th of T * n), so the aggregate is evenly spaced, not
-- T requests at the same instants. (A thread's rate is the total over T, and its n
-- schedules share it: with uneven connection counts the spacing is still even.)
function M.first_send(st, k, n, interval)
  local cfg = st.cfg
  local T = cfg.all_threads or cfg.threads or 1
  local g = cfg.wrk_thread_id or cfg.thread_id or 1
  return st.t_start + ((g - 1) + T * (k - 1)) * interval // (T * n)
end

-- Waits, sending nothing, until the run stops: a -R schedule whose next request is due at or
-- after the end of the run (sending it at the deadline's edge would count one more interval
-- than the run has).
local function idle_to_end(st)
  while not st.stop do mw.sleep(math.max(0.001, (st.deadline - hrtime()) / 1e9)) end
end
M.idle_to_end = idle_to_end

-- One connection's life: connect, send, read, again, until the thread stops.
local function connection(st, id, hooks)
  local cfg = st.cfg
  local interval_ns = cfg.rate and cfg.rate > 0 and math.floor(1e9 * cfg.conns_in_thread / cfg.rate) or nil
  local next_send = interval_ns and M.first_send(st, id, cfg.conns_in_thread, interval_ns) or nil
  local fixed = hooks.fixed_request
  local depth = fixed and hooks.fixed_depth or 1
  local timeout = cfg.timeout
  local head = fixed and fixed:sub(1, 5) == "HEAD "   -- (an answer to HEAD has no body)
  while not st.stop do
    local sock = connect(cfg)
    if not sock then
      st.errors.connect = st.errors.connect + 1
      mw.sleep(0.05)
    else
      local hc = http_conn(sock, { head = 65536, headers = 1000 }, Response, true)
      local alive = true
      local timed_out_at_end = false
      while alive and not st.stop do
        if hooks.delay then
          local ms = call_hook(st, hooks.delay)
          if st.stop then break end
          ms = tonumber(ms)   -- (as wrk reads it: a numeric string is a number, anything else 0)
          if ms and ms > 0 then mw.sleep(ms / 1000) end
          if st.stop then break end
        end
        local req = fixed
        if hooks.request then
          req = call_hook(st, hooks.request)
          if st.stop then break end
          if type(req) ~= "string" then
            hook_failed(st, "request() returned a " .. type(req) .. ", not the request's bytes")
            break
          end
          if hooks.request_depth == nil then hooks.request_depth = math.max(1, wrkenv.count_requests(req)) end
          depth = hooks.request_depth
          head = req:sub(1, 5) == "HEAD "
        end
        local t0
        if next_send then
          if next_send >= st.deadline then idle_to_end(st) break end
          local now = hrtime()
          if next_send > now then
            mw.sleep((next_send - now) / 1e9)
            if st.stop then break end
          end
          t0 = next_send
          next_send = next_send + interval_ns
        else
          t0 = hrtime()
        end
        st.inflight = st.inflight + depth
        st.pending[id] = depth        -- (requests written and not answered yet: hung if left)
        local ok = sock:write(req)
        if not ok then
          st.errors.write = st.errors.write + 1
          st.inflight = st.inflight - depth
          st.pending[id] = nil
          break
        end
        for _ = 1, depth do
          local status, bytes, keep
          if hooks.response then
            -- one timeout for the whole answer, head and body, as the lean path has
            local t_end = hrtime() + math.floor(timeout * 1e9)
            local function left() return math.max(0, (t_end - hrtime()) / 1e9) end
            local res, _, code
            local interim = 0   -- their bytes count, as on the lean path (and in wrk)
            repeat  -- interim responses (100, 103) are not the answer, as in the client
              res, _, code = hc:read_request(-1, left(), head)
              if res and res.status < 200 and res.status ~= 101 then interim = interim + hc:message_bytes() end
            until not res or res.status >= 200 or res.status == 101
            if res then
              local body
              body, _, code = res._conn:read_body("all", -1, left())
              if body then
                -- the bytes read, head and framing included (wrk's Transfer/sec), not the body's
                status, bytes, keep = res.status, interim + hc:message_bytes(), res.keepalive
                -- wrk hands the names as the server sent them: any case finds them here
                setmetatable(res.headers, headers_ci)
                -- (not for an answer after the end: it is not counted either, see record)
                if not st.t_end then call_hook(st, hooks.response, res.status, res.headers, body) end
              end
            end
            if not status then
              if code == "timeout" then
                if st.stop then timed_out_at_end = true else st.errors.timeout = st.errors.timeout + 1 end
              else
                st.errors.read = st.errors.read + 1
              end
              alive = false
            end
          else
            status, bytes, keep = hc:read_lean(timeout, head)
            if not status then
              if bytes == "timeout" then
                -- timing out while draining at the end: still unanswered, reported as hung
                if st.stop then timed_out_at_end = true else st.errors.timeout = st.errors.timeout + 1 end
              else
                -- closed (or reset) with this request written and unanswered: it was lost,
                -- as wrk counts it
                st.errors.read = st.errors.read + 1
              end
              alive = false
            end
          end
          if not alive then
            -- this request and those behind it in the batch will not be answered here
            st.inflight = st.inflight - st.pending[id]
            if not timed_out_at_end then st.pending[id] = nil end
            break
          end
          st.inflight = st.inflight - 1
          st.pending[id] = st.pending[id] - 1
          record(st, status, (hrtime() - t0) // 1000, bytes)
          if keep == false then
            -- the server ends the connection on purpose (Connection: close, nginx after its
            -- keepalive_requests): the rest of a pipelined batch will not be answered here.
            -- Not read errors: they are dropped, and the next connection writes a new batch
            -- (wrk writes its whole batch again on the new connection)
            alive = false
            st.inflight = st.inflight - st.pending[id]
            break
          end
        end
        if not timed_out_at_end then st.pending[id] = nil end
      end
      sock:close()
    end
  end
end

-- Requests and errors so far (the HTTP/2 C driver keeps its own counts).
local function counts(st)
  local errs = 0
  for _, v in pairs(st.errors) do errs = errs + v end
  if st.h2b then
    local n, e = st.h2b:count()
    return st.count + n, errs + e
  end
  return st.count, errs
end

-- Samples the thread's req/s every 100 ms (wrk's "Req/Sec") and keeps a per-second timeline.
local function sampler(st)
  local last, last_t = 0, hrtime()
  local sec_count, sec_t, sec_errors = 0, hrtime(), 0
  st.final_second = function()
    local now = hrtime()
    if now - sec_t < 0.05e9 then return end
    local count, errs = counts(st)
    st.timeline[#st.timeline + 1] = {
      t = (now - st.t_start) / 1e9, rps = (count - sec_count) * 1e9 / (now - sec_t),
      p50 = st.second:percentile(50), p99 = st.second:percentile(99), max = select(3, st.second:stats()),
      errors = errs - sec_errors,
    }
    if st.reporter then st.reporter(st) end
    -- (this second is counted: the sampler, waking once more, must not count it again)
    st.second:reset()
    sec_count, sec_t, sec_errors = count, now, errs
  end
  while not st.stop do
    mw.sleep(0.1)
    local now = hrtime()
    local count, errs = counts(st)
    local n = count - last
    st.requests:record(math.floor(n * 1e9 / (now - last_t)))
    last, last_t = count, now
    local shared = st.shared
    if shared then
      local base = 3 * (st.cfg.thread_id - 1)
      shared:set(base + 1, count)
      shared:set(base + 2, errs)
    end
    if now - sec_t >= 1e9 then
      local c = count - sec_count
      st.timeline[#st.timeline + 1] = {
        t = (now - st.t_start) / 1e9, rps = c * 1e9 / (now - sec_t),
        p50 = st.second:percentile(50), p99 = st.second:percentile(99), max = select(3, st.second:stats()),
        errors = errs - sec_errors,
      }
      if st.shared then st.shared:set(3 * (st.cfg.thread_id - 1) + 3, st.timeline[#st.timeline].p99) end
      if st.reporter then st.reporter(st) end   -- before the reset: it reads st.second
      st.second:reset()
      sec_count, sec_t, sec_errors = count, now, errs
      if st.progress then st.progress(st) end
    end
  end
end

--- Waits in the loop until hrtime() reaches `t` (ns): sleeps to 2 ms before, then yields
-- until it (a timer can fire a few ms off a far instant).
function M.wait_until(t)
  while true do
    local w = t - hrtime()
    if w <= 0 then return end
    mw.sleep(w > 3e6 and (w - 2e6) / 1e9 or 0)
  end
end

--- Runs the load of one thread; cfg as built by the CLI. Returns the result table.
function M.run(cfg, hooks, on_stop)
  local st = new_state(cfg)
  st.hooks = hooks
  hooks.state = st   -- (wrk.thread:stop() in a hook stops this thread's requests at once)
  -- the shared cells: 3 per thread (count, errors, p99), then the run's stop flag
  local stop_cell = 3 * cfg.threads + 1
  st.stop_cell = stop_cell
  if cfg.counters then st.shared = core.counters_attach(cfg.counters, stop_cell) end
  local h2tasks
  mw.run(function()
    -- a distributed run starts every agent's threads at one agreed instant (bench/agent.lua)
    if cfg.start_at then M.wait_until(cfg.start_at) end
    st.t_start = hrtime()
    if cfg.reporter then st.reporter = require(cfg.reporter).reporter(cfg, st) end
    local deadline = st.t_start + math.floor(cfg.duration * 1e9)
    st.deadline = deadline
    if cfg.h2 then
      st.t_end_ns = deadline
      st.t_drain_ns = deadline + math.floor(math.min(cfg.timeout, 2) * 1e9)
      h2tasks = require("moonwire.bench.h2").start(st, hooks, hooks.fixed_request)
    else
      for i = 1, cfg.conns_in_thread do mw.spawn(connection, st, i, hooks) end
    end
    local samp = mw.spawn(sampler, st)
    while not st.stop and hrtime() < deadline do
      mw.sleep(math.min(0.05, (deadline - hrtime()) / 1e9))
      if on_stop and on_stop() then st.stop = true end
      if st.shared and st.shared:get(stop_cell) ~= 0 then st.stop = true end   -- another thread failed
    end
    st.stop = true
    if st.h2b then st.h2b:stop() end
    -- (a thread its script stopped ran until then, not until this loop noticed)
    st.t_end = st.t_stopped or hrtime()
    if st.final_second then st.final_second() end
    if h2tasks then
      -- each connection ends once its streams are answered, or at the drain deadline
      for _, t in ipairs(h2tasks) do t:join() end
    end
    -- drain: the requests in flight get up to the timeout (at most 2 s) to complete; those
    -- still unanswered then are reported as hung (wrk never reports them at all)
    local drain_until = hrtime() + math.floor(math.min(cfg.timeout, 2) * 1e9)
    while st.inflight > 0 and hrtime() < drain_until do mw.sleep(0.005) end
    local hung = 0
    for _, n in pairs(st.pending) do hung = hung + n end
    st.hung = hung
    mw.stop()
    local _ = samp
  end)
  st.t_end = st.t_end or hrtime()
  if st.hook_error then error(st.hook_error, 0) end
  local result = {
    count = st.count, bytes = st.bytes, errors = st.errors, statuses = st.statuses,
    duration_us = (st.t_end - st.t_start) // 1000, t_start = st.t_start, timeline = st.timeline, hung = st.hung or 0,
  }
  if st.h2b then require("moonwire.bench.h2").finish(st, result) end
  result.latency, result.requests = st.latency:encode(), st.requests:encode()
  return result
end

--- Entry point of a bench thread: arg is the serialized config; the thread's globals
-- hold what setup() gave it through thread:set. Returns the serialized result.
function M.thread_main(arg)
  local cfg = serial.decode(arg)
  local hooks = {}
  local stop_flag = false
  local thread = { id = cfg.wrk_thread_id or cfg.thread_id }   -- (an agent's thread: the test-wide number)
  -- where this thread connects (setup()'s thread.addr), as wrk.thread.addr reads in wrk
  if cfg.addr then thread.addr = setmetatable({ host = cfg.addr.host, port = cfg.addr.port }, wrkenv.Addr) end
  -- wrk stops the thread's loop at once: no request goes out after the hook that called it
  function thread.stop()
    stop_flag = true
    local st = hooks.state
    if st and not st.stop then st.stop, st.t_stopped = true, hrtime() end
  end
  function thread.get(_, name) return rawget(_G, name) end
  function thread.set(_, name, v) rawset(_G, name, v) end
  local _, wrk = wrkenv.env(cfg.target, cfg.headers, thread, _G)
  wrk.method = cfg.method or "GET"
  wrk.body = cfg.body
  wrk.request = function() return wrk.format(nil, nil, nil, nil) end
  if cfg.script then
    wrkenv.load(cfg.script, _G)
    -- wrk's own init puts the Host header into wrk.headers before the script's init() runs
    -- (scripts read wrk.headers.Host); one given with -H or by the script stays
    local has_host = false
    for k in pairs(wrk.headers) do if tostring(k):lower() == "host" then has_host = true end end
    if not has_host then wrk.headers.Host = cfg.target.authority end
    local init = rawget(_G, "init")
    if init then
      local args = { [0] = cfg.url }
      for i, a in ipairs(cfg.script_args or {}) do args[i] = a end
      init(args)
    end
    hooks.request = rawget(_G, "request")
    hooks.response = rawget(_G, "response")
    hooks.delay = rawget(_G, "delay")
  end
  -- without a request() hook (no script, or one that only sets wrk's fields) the request is
  -- fixed, and --pipeline N writes N of it at a time (a request() hook pipelines by returning
  -- several requests: the CLI refuses --pipeline with it)
  if not hooks.request then
    local one = wrk.format(nil, nil, nil, nil)
    hooks.fixed_request = one:rep(cfg.pipeline or 1)
    hooks.fixed_depth = math.max(1, wrkenv.count_requests(one)) * (cfg.pipeline or 1)
  end
  local result = M.run(cfg, hooks, function() return stop_flag end)
  -- an agent's thread: the script's globals go back with the result, for thread:get() in
  -- the coordinator's done() (one process reads them from the live thread state)
  if cfg.report then result.globals = serial.globals(_G, { _VERSION = true }) end
  return serial.encode(result)
end

return M
