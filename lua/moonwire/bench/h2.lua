--- The HTTP/2 load of one bench thread: `-c` connections with `-m` concurrent streams each
-- (h2load's meaning). Without request()/response()/delay() hooks the requests are run by
-- the C driver (h2client.c: conn:bench), which submits and counts them with no Lua call per
-- request; with hooks, `m` tasks per connection run the hooks and send each request on the
-- shared connection. wrk-format requests (raw HTTP/1.1 bytes) are translated into
-- pseudo-headers. A GOAWAY or a broken connection opens a new one; refused streams are
-- sent again (counted).
local mw = require "moonwire"
local core = require "moonwire.core"
local engine = require "moonwire.bench.engine"

local hrtime = core.hrtime
local call_hook, hook_failed = engine.call_hook, engine.hook_failed

local M = {}

-- The first request of raw HTTP/1.1 bytes as { method, path, authority, headers (flat,
-- without Host and connection-specific fields), body }, or nil, err.
function M.translate(raw, default_authority)
  local head_end = raw:find("\r\n\r\n", 1, true)
  if not head_end then return nil, "request without an end of head" end
  local line, rest = raw:match("^([^\r\n]*)\r\n(.*)$")
  local method, path = (line or ""):match("^(%S+)%s+(%S+)%s+HTTP/1%.[01]$")
  if not method then return nil, "bad request line '" .. tostring(line) .. "'" end
  local flat, authority, length = {}, default_authority, nil
  local head = raw:sub(#line + 3, head_end + 1)
  for k, v in head:gmatch("([^:\r\n]+):[ \t]*([^\r\n]*)\r\n") do
    local lk = k:lower()
    if lk == "host" then authority = v
    elseif lk == "content-length" then length = tonumber(v) flat[#flat + 1] = lk flat[#flat + 1] = v
    elseif lk ~= "connection" and lk ~= "keep-alive" and lk ~= "transfer-encoding" and lk ~= "upgrade"
      and lk ~= "proxy-connection" then
      flat[#flat + 1] = lk
      flat[#flat + 1] = v
    end
  end
  local body = length and raw:sub(head_end + 4, head_end + 3 + length) or nil
  if body == "" then body = nil end
  local _ = rest
  return { method = method, path = path, authority = authority, headers = flat, body = body }
end

local function connect(cfg)
  local opts = { timeout = cfg.timeout, local_host = cfg.source }   -- (an agent's --source)
  if cfg.target.scheme == "https" then
    opts.tls = { insecure = not cfg.verify, alpn = { "h2" } }
  end
  local sock, err, code = mw.tcp.connect(cfg.addr.host, cfg.addr.port, opts)
  if not sock then return nil, err, code end
  if cfg.target.scheme == "https" then
    local info = sock:tls_info()
    if not (info and info.alpn == "h2") then
      sock:close()
      return nil, "the server did not negotiate h2 by ALPN", "alpn"
    end
  end
  return sock
end

local conn_opts = { stream_window = 1048576, conn_window = 16777216 }

-- One connection of the C driver, reopened after a GOAWAY or an error until the run ends.
local function c_connection(st, id, spec)
  local cfg = st.cfg
  local sp = {}
  for k, v in pairs(spec) do sp[k] = v end
  local interval = cfg.rate and cfg.rate > 0 and math.floor(1e9 * cfg.conns_in_thread / cfg.rate) or 0
  sp.interval_ns = interval
  sp.next_send = interval > 0 and engine.first_send(st, id, cfg.conns_in_thread, interval) or 0
  sp.end_ns, sp.drain_ns = st.t_end_ns, st.t_drain_ns
  sp.timeout_ns = math.floor(cfg.timeout * 1e9)
  sp.streams = cfg.streams or 1
  local b = st.h2b
  local first = true
  while not st.stop and hrtime() < st.t_end_ns do
    local sock, err = connect(cfg)
    if not sock then
      st.errors.connect = st.errors.connect + 1
      st.connect_error = st.connect_error or err
      mw.sleep(0.05)
    else
      if not first then b:add("reconnects") end
      first = false
      local hc = core.h2_client(sock, conn_opts)
      local why, answered = hc:bench(b, sp)
      hc:close()
      sock:close()
      if why == "done" or why == "hung" then break end
      if why == "goaway" and answered == 0 then
        -- a server that sends GOAWAY before answering anything: an error, and a pause
        -- before the next connection instead of a reconnect storm
        st.errors.connect = st.errors.connect + 1
        st.connect_error = st.connect_error or "GOAWAY before any answer"
        mw.sleep(0.05)
      end
    end
  end
end

-- Whether a failed request was never processed by a connection going away: not submitted
-- (code "goaway", no stream s), its HEADERS never sent, or above the GOAWAY's last stream id
-- (bench_done's rule in h2client.c).
local function unprocessed(hc, s, code)
  if code == "goaway" then return true end
  if code ~= "refused" or not s then return false end
  local _, _, id, sent = s:state()
  if not sent then return true end
  local info = hc:info()
  return info.goaway ~= nil and id > info.last_stream_id
end

-- One request of the hooks path on hc: status, headers, body, bytes (the frames received,
-- as the C driver counts them), or nil, err, code, unprocessed. Code "refused"
-- (REFUSED_STREAM, above a GOAWAY's last stream id) or "goaway" (the connection was going
-- away): the server did not process it, it may go again; `unprocessed` when a connection
-- going away never processed it (not a failure of the request: no retry used up).
local function exchange(st, hc, spec, r, t0)
  -- one deadline for the whole answer (as engine.lua), and none past the end of the drain
  local t_end = math.min(hrtime() + math.floor(st.cfg.timeout * 1e9), st.t_drain_ns)
  local function left() return math.max(0, (t_end - hrtime()) / 1e9) end
  local s, err, code = hc:request(r.method, spec.scheme, r.authority or spec.authority, r.path, r.headers,
    #r.headers // 2, r.body)
  if not s then return nil, err, code, unprocessed(hc, nil, code) end
  local status, headers
  -- (a request that failed, a timeout say, is reset: its stream would hold one of the
  -- connection's slots for good)
  status, headers, code = s:head(left())
  if not status then
    local gone = unprocessed(hc, s, code)
    s:reset()
    return nil, headers, code, gone
  end
  st.ttfb:record((hrtime() - t0) // 1000)
  local body
  body, err, code = s:read("all", -1, left())
  if not body then s:reset() return nil, err, code, false end
  return status, headers, body, st.h2b:received(s)
end

-- The next request of a stream task: r (translated), t0 (when due), or nil when the run
-- stops (st.stop, a hook failed) or the connection is gone. A request left by the last
-- connection (slot.carry: refused, or due when it ended) goes first, with its own t0.
local function next_request(st, shared, hooks, spec, slot)
  local carry = slot.carry
  if carry then
    slot.carry = nil
    return carry.r, carry.t0, carry.retried
  end
  -- the hooks run as over HTTP/1.1 (engine.call_hook): one that raises stops the run
  if hooks.delay then
    local ms = call_hook(st, hooks.delay)
    if st.stop then return nil end
    ms = tonumber(ms)   -- (as wrk reads it: a numeric string is a number, anything else 0)
    if ms and ms > 0 then mw.sleep(ms / 1000) end
    if st.stop then return nil end
  end
  local r = spec
  if hooks.request then
    local raw = call_hook(st, hooks.request)
    if st.stop then return nil end
    if type(raw) ~= "string" then
      hook_failed(st, "request() returned a " .. type(raw) .. ", not the request's bytes")
      return nil
    end
    local err
    r, err = M.translate(raw, spec.authority)
    if not r then
      hook_failed(st, "request(): " .. err)
      return nil
    end
  end
  -- -R: sent when due, latency and time to first byte counted from then (as engine.lua)
  local t0
  if slot.interval then
    local now = hrtime()
    if slot.next_send >= st.t_end_ns then   -- (due at or after the end: not sent)
      engine.idle_to_end(st)
      return nil
    end
    if slot.next_send > now then
      mw.sleep((slot.next_send - now) / 1e9)
      if st.stop then return nil end
    end
    t0 = slot.next_send
    slot.next_send = slot.next_send + slot.interval
    if shared.dead then   -- (the connection ended meanwhile: the request goes on the next)
      slot.carry = { r = r, t0 = t0, retried = false }
      return nil
    end
  else
    t0 = hrtime()
  end
  return r, t0, false
end

-- The hooks' path: m tasks per connection share it, one request each at a time. `slot`
-- outlives the connection: a stream's place in the -R schedule (next_send) and a refused
-- request to send on the next connection (carry).
local function lua_stream(st, shared, hooks, spec, slot)
  while not st.stop and not shared.dead do
    local r, t0, retried = next_request(st, shared, hooks, spec, slot)
    if not r then break end
    while true do
      local hc = shared.hc
      st.inflight = st.inflight + 1
      local status, headers, body, bytes = exchange(st, hc, spec, r, t0)
      st.inflight = st.inflight - 1
      if status and st.t_end then
        -- answered during the drain: not one of the run's requests (engine.lua's record)
        break
      elseif status then
        shared.done = shared.done + 1
        st.count = st.count + 1
        st.bytes = st.bytes + bytes
        local us = (hrtime() - t0) // 1000
        st.latency:record(us)
        st.second:record(us)
        st.statuses[status] = (st.statuses[status] or 0) + 1
        if status > 399 then st.errors.status = st.errors.status + 1 end
        if hooks.response then
          setmetatable(headers, engine.headers_ci)   -- (HTTP/2 names are lower case: any case finds them)
          call_hook(st, hooks.response, status, headers, body)
        end
        break
      end
      -- (a failure: headers, body, bytes are err, code, unprocessed)
      local code, usable = body, hc:usable()
      if not usable then shared.dead = true end
      -- never processed by a connection going away: to the next one, the retry not used up
      local free = bytes and not usable
      if (code == "refused" or code == "goaway") and (free or not retried) then
        -- not processed by the server: sent again once, here or on the next connection,
        -- due when it was (as the C driver does)
        if not free then retried = true end
        st.h2b:add("refused_retries")
        if not usable then
          slot.carry = { r = r, t0 = t0, retried = retried }
          break
        end
      else
        if code == "timeout" then
          -- unanswered when the run ended: reported as hung, as over HTTP/1.1
          if st.stop or hrtime() >= st.t_end_ns then st.h2b:add("hung")
          else st.errors.timeout = st.errors.timeout + 1 end
        else
          st.errors.read = st.errors.read + 1
        end
        break
      end
    end
  end
end

local function lua_connection(st, id, hooks, spec)
  local cfg = st.cfg
  local first = true
  -- -R: each of the thread's conns x streams tasks sends one request per interval, their
  -- starts spread over one interval (the C driver's schedule, per stream)
  local streams = cfg.streams or 1
  local slots = {}
  for i = 1, streams do
    local slot = {}
    if cfg.rate and cfg.rate > 0 then
      local n = cfg.conns_in_thread * streams
      slot.interval = math.floor(1e9 * n / cfg.rate)
      slot.next_send = engine.first_send(st, (id - 1) * streams + i, n, slot.interval)
    end
    slots[i] = slot
  end
  while not st.stop do
    local sock = connect(cfg)
    if not sock then
      st.errors.connect = st.errors.connect + 1
      mw.sleep(0.05)
    else
      if not first then st.h2b:add("reconnects") end
      first = false
      local shared = { hc = core.h2_client(sock, conn_opts), done = 0 }
      shared.hc:attach(st.h2b)   -- (its RST_STREAM and GOAWAY frames count)
      local workers = {}
      for i = 1, streams do workers[i] = mw.spawn(lua_stream, st, shared, hooks, spec, slots[i]) end
      for _, w in ipairs(workers) do w:join() end
      shared.hc:close()
      sock:close()
      -- a server that ends every connection before answering: not a reconnect storm
      if shared.done == 0 and not st.stop then mw.sleep(0.05) end
    end
  end
  -- refused requests the run ended before sending again: due, never answered
  for _, slot in ipairs(slots) do
    if slot.carry then st.h2b:add("hung") end
  end
end

--- Starts the thread's HTTP/2 connections; returns the tasks (they end by themselves once
-- st.stop is set and what is in flight is answered, or st.t_drain_ns passes).
function M.start(st, hooks, fixed_raw)
  local cfg = st.cfg
  local authority = cfg.target.authority
  st.ttfb = core.histogram()
  st.h2b = core.h2_bench(st.latency, st.second, st.ttfb)
  local spec
  if fixed_raw then
    local err
    spec, err = M.translate(fixed_raw, authority)
    if not spec then error("request: " .. err, 0) end
  else
    spec = { method = cfg.method or "GET", path = cfg.target.target, authority = authority, headers = {} }
  end
  spec.scheme = cfg.target.scheme
  spec.authority = spec.authority or authority
  local tasks = {}
  local lua_path = hooks.request or hooks.response or hooks.delay
  for i = 1, cfg.conns_in_thread do
    if lua_path then tasks[i] = mw.spawn(lua_connection, st, i, hooks, spec)
    else tasks[i] = mw.spawn(c_connection, st, i, spec) end
  end
  return tasks
end

--- The thread's HTTP/2 figures, merged into its result.
function M.finish(st, result)
  local s = st.h2b:stats()
  result.count = result.count + s.count
  result.bytes = result.bytes + s.bytes
  for code, n in pairs(s.statuses) do result.statuses[code] = (result.statuses[code] or 0) + n end
  result.errors.status = result.errors.status + s.status_errors
  result.errors.timeout = result.errors.timeout + s.timeouts
  result.errors.read = result.errors.read + s.read_errors
  result.hung = result.hung + s.hung
  result.h2 = { streams = st.cfg.streams or 1, rst = s.rst, goaway = s.goaway, refused_retries = s.refused_retries,
    reconnects = s.reconnects, ttfb = st.ttfb:encode() }
  return result
end

return M
