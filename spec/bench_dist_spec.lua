-- Distributed `moonwire bench` (docs/bench.md, "Distributed runs"): a real redis-server
-- started once for this file (spec/redis_server.lua); agents are separate processes bound to
-- their own loopback source addresses (127.0.0.2, .3, ...); the coordinator is a subprocess;
-- the HTTP/WebSocket target serves in this process and records who asked and when. Each test
-- uses its own Redis database, so agents of one test never take work of another. Runs are
-- short (-d 2..3) and every wait is bounded.
local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"
local core = require "moonwire.core"
local redis = require "moonwire.redis"
local serial = require "moonwire.bench.serial"
local redis_server = require "spec.redis_server"

local ROOT = (function()
  local p = assert(io.popen("pwd"))
  local dir = p:read("l")
  p:close()
  return dir
end)()

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function writefile(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- a small JSON decoder (null -> NULL)
local NULL = setmetatable({}, { __tostring = function() return "null" end })
local function json_decode(s)
  local pos = 1
  local value
  local function ws() pos = s:find("[^ \t\r\n]", pos) or #s + 1 end
  local function str()
    local out = {}
    pos = pos + 1
    while true do
      local c = s:sub(pos, pos)
      if c == '"' then pos = pos + 1 return table.concat(out) end
      if c == "\\" then
        local e = s:sub(pos + 1, pos + 1)
        if e == "u" then
          out[#out + 1] = utf8.char(tonumber(s:sub(pos + 2, pos + 5), 16))
          pos = pos + 6
        else
          out[#out + 1] = ({ n = "\n", t = "\t", r = "\r", b = "\b", f = "\f" })[e] or e
          pos = pos + 2
        end
      else
        out[#out + 1] = c
        pos = pos + 1
      end
    end
  end
  function value()
    ws()
    local c = s:sub(pos, pos)
    if c == "{" or c == "[" then
      local t, obj = {}, c == "{"
      pos = pos + 1
      ws()
      if s:sub(pos, pos) == (obj and "}" or "]") then pos = pos + 1 return t end
      while true do
        if obj then
          ws()
          local k = str()
          ws()
          pos = pos + 1   -- ':'
          t[k] = value()
        else
          t[#t + 1] = value()
        end
        ws()
        local d = s:sub(pos, pos)
        pos = pos + 1
        if d ~= "," then return t end
      end
    end
    if c == '"' then return str() end
    for word, v in pairs{ ["true"] = true, ["false"] = false, null = NULL } do
      if s:sub(pos, pos + #word - 1) == word then pos = pos + #word return v end
    end
    local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
    pos = pos + #num
    return tonumber(num)
  end
  return value()
end

---------------------------------------------------------------------------------------------
-- processes

local procs = {}      -- pid -> true, killed at teardown
local temps = {}

local function tmp(suffix)
  local name = os.tmpname()
  temps[#temps + 1] = name
  if suffix then
    name = name .. suffix
    temps[#temps + 1] = name
  end
  return name
end

local function env_prefix()
  local vars = { "LUA_PATH=" .. quote(package.path), "LUA_CPATH=" .. quote(package.cpath) }
  local preload = os.getenv("MW_ASAN_PRELOAD")
  if preload then vars[#vars + 1] = "LD_PRELOAD=" .. quote(preload) end
  return "env " .. table.concat(vars, " ")
end

local function alive(pid) return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true end

local function kill(pid, sig)
  if pid and alive(pid) then os.execute(("kill -%s %d 2>/dev/null"):format(sig or "KILL", pid)) end
end

-- Starts `moonwire bench ARGS` in the background (exec'd: the pid is lua5.4's own);
-- -> { pid, out, err, rc }
local function bg(args)
  local words = {}
  for i, a in ipairs(args) do words[i] = quote(a) end
  local h = { out = tmp(".out"), err = tmp(".err"), rc = tmp(".rc") }
  os.remove(h.rc)
  local inner = ("exec %s lua5.4 %s bench %s >%s 2>%s </dev/null"):format(env_prefix(),
    quote(ROOT .. "/bin/moonwire"), table.concat(words, " "), h.out, h.err)
  -- the wrapper records the exit status; `$!` of the inner job is lua5.4's pid
  local p = assert(io.popen(("(%s & echo $! ; wait $! ; echo $? >%s.tmp ; mv %s.tmp %s) 2>/dev/null &"):format(
    inner, h.rc, h.rc, h.rc)))
  h.pid = math.tointeger(tonumber(p:read("l")))
  p:close()
  procs[h.pid] = true
  return h
end

-- Waits (from the loop) for a bg process to exit; -> code, stdout, stderr
local function wait(h, limit)
  local deadline = mw.now() + limit
  while true do
    local s = readfile(h.rc)
    if s and s ~= "" then break end
    if mw.now() > deadline then
      kill(h.pid)
      error("process did not finish in time:\n" .. (readfile(h.out) or "") .. (readfile(h.err) or ""))
    end
    mw.sleep(0.05)
  end
  procs[h.pid] = nil
  return math.tointeger(tonumber(readfile(h.rc))), readfile(h.out) or "", readfile(h.err) or ""
end

local function context(h)
  return "\n--- stdout:\n" .. (readfile(h.out) or "") .. "\n--- stderr:\n" .. (readfile(h.err) or "")
end

---------------------------------------------------------------------------------------------
-- redis, agents, the target

local srv            -- the redis-server
local db_next = 0

local function via(db) return ("redis://127.0.0.1:%d/%d"):format(srv.port, db) end

-- n agents on 127.0.0.2.. for a fresh database; -> url, { agent handles }
local function agents(n, threads)
  db_next = db_next + 1
  local u = via(db_next)
  local list = {}
  for i = 1, n do
    list[i] = bg{ "--agent", u, "--agent-name", ("agent%d"):format(i), "--source", ("127.0.0.%d"):format(i + 1),
      "-t", tostring(threads or 1) }
  end
  return u, list
end

local function stop_agents(list)
  for _, a in ipairs(list) do kill(a.pid) procs[a.pid] = nil end
end

-- The target: counts requests per source address, remembers the time of the last one,
-- answers /ws as a WebSocket echo and counts /setup calls.
local function target()
  local t = { count = 0, by_source = {}, by_path = {}, last = 0, setup = 0 }
  t.srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(req, res)
    t.count = t.count + 1
    t.last = mw.now()
    t.by_source[req.remote_addr] = (t.by_source[req.remote_addr] or 0) + 1
    t.by_path[req.path] = (t.by_path[req.path] or 0) + 1
    if req.path == "/ws" then
      local ws = req:websocket()
      if ws then for msg, kind in ws:messages() do ws:send(msg, kind) end end
      return
    end
    if req.path == "/setup" then t.setup = t.setup + 1 end
    res:send("ok")
  end })
  t.url = ("http://127.0.0.1:%d/"):format(t.srv.port)
  return t
end

local function wait_for(cond, limit, what)
  local deadline = mw.now() + limit
  while not cond() do
    if mw.now() > deadline then error("timed out waiting for " .. what) end
    mw.sleep(0.02)
  end
end

local function coordinator(u, n, extra)
  local args = { "--agents", tostring(n), "--via", u, "--quiet", "--agent-wait", "10s" }
  for _, a in ipairs(extra) do args[#args + 1] = a end
  return bg(args)
end

-- A hand-made agent in this process, to play the agent's side of the protocol wrongly or
-- slowly: its heartbeat key says fa.info every 0.3 s until fa.stop(); fa.job() takes its job
-- (and says busy with that run, as an agent does); fa.event() adds to the run's stream.
local function fake_agent(u, name)
  local fa = { info = { name = name, threads = 1, state = "idle" },
    r = assert(redis.connect(u)), b = assert(redis.connect(u)) }
  local hb = "mwbench:agent:" .. name
  mw.spawn(function()
    while not fa.stopped do
      fa.r:call("SET", hb, serial.encode(fa.info), "PX", 2000)
      fa.r:call("ZADD", "mwbench:agents", os.time(), name)
      mw.sleep(0.3)
    end
    fa.r:call("DEL", hb)
    fa.r:call("ZREM", "mwbench:agents", name)
    fa.r:close()
    fa.b:close()
  end)
  function fa.job(limit)
    local v = assert(fa.b:call("BLPOP", hb .. ":jobs", limit))
    assert(v ~= redis.null, "no job for " .. name)
    local job = serial.decode(v[2])
    fa.info.state, fa.info.run = "busy", job.run
    fa.r:call("SET", hb, serial.encode(fa.info), "PX", 2000)
    return job
  end
  function fa.event(run_id, kind, d, h)
    local stream = ("mwbench:run:%d:events"):format(run_id)
    if type(d) ~= "string" then d = serial.encode(d) end
    if h then return assert(fa.r:call("XADD", stream, "*", "k", kind, "a", name, "d", d, "h", h)) end
    return assert(fa.r:call("XADD", stream, "*", "k", kind, "a", name, "d", d))
  end
  function fa.blpop(k, limit)
    return fa.b:call("BLPOP", ("mwbench:run:%d:%s:%s"):format(fa.info.run, k, name), limit)
  end
  function fa.stop() fa.stopped = true end
  return fa
end

---------------------------------------------------------------------------------------------

describe("distributed bench", function()
  -- one database per test: more than Redis's default 16
  setup(function() srv = redis_server.start{ args = { "--databases", "64" } } end)
  teardown(function()
    for pid in pairs(procs) do kill(pid) end
    if srv then srv.stop() end
    for _, f in ipairs(temps) do os.remove(f) end
  end)

  it("merges histograms bit-exactly through the serialization path (values out of range are counted)", function()
    run(function()
      local r = assert(redis.connect(srv.url .. "/15"))
      math.randomseed(17)
      local one = core.histogram()
      local parts = { core.histogram(), core.histogram(), core.histogram() }
      for i = 1, 200000 do
        local v
        local k = i % 7
        if k == 0 then v = math.random(0, 2047)
        elseif k < 5 then v = math.floor(math.exp(math.random() * 28))
        elseif k == 5 then v = math.random(0, 1 << 45)              -- far beyond 2^41 - 1
        else v = math.random(1, 100) * 1000 end
        one:record(v)
        parts[math.random(1, 3)]:record(v)
      end
      one:record(1 << 50, 3)
      parts[2]:record(1 << 50, 3)
      -- each part as an agent sends it: a stream entry (binary field + serialized table)
      for i, h in ipairs(parts) do
        assert(r:xadd("hdrtest", "*", "d", serial.encode{ part = i, count = (h:stats()) }, "h", h:encode()))
      end
      local entries = assert(r:xrange("hdrtest", "-", "+"))
      assert.equal(3, #entries)
      local merged = core.histogram()
      for j = #entries, 1, -1 do   -- merge order does not matter
        local f = entries[j][2]
        assert.equal("h", f[3])
        local d = serial.decode(f[2])
        local h = core.histogram_decode(f[4])
        assert.equal(d.count, (h:stats()))
        merged:merge(h)
      end
      assert.equal(one:encode(), merged:encode())            -- every bucket, count, min, max, sum
      assert.same(one:buckets(), merged:buckets())
      assert.same({ one:stats() }, { merged:stats() })
      assert.is_true(one:clamped() > 0)
      assert.equal(one:clamped(), merged:clamped())
      for _, p in ipairs{ 50, 90, 99, 99.9, 99.999 } do assert.equal(one:percentile(p), merged:percentile(p)) end
      r:close()
    end)
  end)

  it("runs one test on three agents bound to their own source addresses, started together", function()
    run(function()
      local t = target()
      local u, list = agents(3)
      local json = tmp(".json")
      local c = coordinator(u, 3, { "-c", "6", "-d", "2", "--latency", "--json", json, t.url })
      local code, out = wait(c, 30)
      stop_agents(list)
      assert.equal(0, code, context(c))
      local doc = json_decode(readfile(json))
      assert.equal(3, doc.threads)
      assert.equal(3, #doc.agents)
      local sum, starts, offsets = 0, {}, {}
      for i, a in ipairs(doc.agents) do
        assert.equal("agent" .. i, a.name)
        assert.equal("ok", a.state)
        assert.equal(2, a.connections)
        assert.is_true(a.requests > 0)
        sum = sum + a.requests
        starts[#starts + 1] = a.start_monotonic_ns
        offsets[#offsets + 1] = a.clock_offset_us
        -- the agent's own load came from its source address
        assert.is_true((t.by_source["127.0.0." .. (i + 1)] or 0) >= a.requests, "source " .. i)
      end
      assert.equal(doc.requests, sum)
      assert.equal(0, doc.out_of_range)
      assert.is_nil(t.by_source["127.0.0.1"])
      -- one machine: the agents' monotonic clocks are one clock, so their measured offsets to
      -- Redis must agree (to within a round trip), and the starts compare directly. The spread
      -- is mostly scheduling on this shared 2-core box (the agents start loading at once).
      table.sort(offsets)
      assert.is_true(offsets[3] - offsets[1] < 500, ("clock offsets differ by %d us"):format(offsets[3] - offsets[1]))
      table.sort(starts)
      assert.is_true(starts[3] - starts[1] < 25e6, ("start spread %d ns"):format(starts[3] - starts[1]))
      assert.matches("Agents:", out)
      assert.matches("Requests/sec:", out)
      t.srv:close(0)
    end, 40)
  end)

  it("judges thresholds on the merged figures, not on each agent's alone (both ways)", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local json = tmp(".json")
      -- 200 req/s over 2 s: about 400 requests merged, about 200 on each agent
      local c = coordinator(u, 2, { "-c", "4", "-d", "2", "-R", "200", "--json", json,
        "--threshold", "requests>300", "--threshold", "requests<300", t.url })
      local code = wait(c, 30)
      stop_agents(list)
      assert.equal(1, code, context(c))
      local doc = json_decode(readfile(json))
      assert.is_true(doc.requests > 300 and doc.requests < 500, context(c))
      assert.is_true(doc.thresholds[1].pass)     -- requests>300: passes merged...
      assert.is_false(doc.thresholds[2].pass)    -- requests<300: fails merged...
      for _, a in ipairs(doc.agents) do
        assert.is_false(a.thresholds[1].pass)    -- ...fails on each agent alone
        assert.is_true(a.thresholds[2].pass)     -- ...passes on each agent alone
      end
      t.srv:close(0)
    end, 40)
  end)

  it("marks an agent killed mid-test as lost, keeps its intervals and still reports", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local json = tmp(".json")
      local c = coordinator(u, 2, { "-c", "4", "-d", "3", "-R", "400", "--json", json, t.url })
      wait_for(function() return (t.by_source["127.0.0.3"] or 0) > 0 end, 15, "agent 2's load")
      mw.sleep(1.3)   -- at least one interval snapshot sent
      kill(list[2].pid)
      local code, out = wait(c, 30)
      stop_agents(list)
      assert.equal(1, code, context(c))
      assert.matches("lost", out)
      local doc = json_decode(readfile(json))
      assert.equal("ok", doc.agents[1].state)
      assert.is_true(doc.agents[2].lost)
      assert.is_true(doc.agents[2].requests > 0, "its intervals are kept")
      assert.is_true(doc.agents[2].requests < t.by_source["127.0.0.3"] + 1)
      assert.equal(doc.requests, doc.agents[1].requests + doc.agents[2].requests)
      t.srv:close(0)
    end, 40)
  end)

  it("stops every agent when one is lost with --on-agent-loss stop", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local json = tmp(".json")
      local c = coordinator(u, 2, { "-c", "4", "-d", "20", "-R", "400", "--json", json,
        "--on-agent-loss", "stop", t.url })
      wait_for(function() return (t.by_source["127.0.0.3"] or 0) > 0 end, 15, "agent 2's load")
      local t0 = mw.now()
      kill(list[2].pid)
      local code = wait(c, 30)
      stop_agents(list)
      assert.equal(1, code, context(c))
      assert.is_true(mw.now() - t0 < 10, "the run stopped early")
      local doc = json_decode(readfile(json))
      assert.equal("stopped: stopped by the coordinator", doc.agents[1].state)
      assert.is_true(doc.agents[2].lost)
      t.srv:close(0)
    end, 40)
  end)

  it("has agents stop their load within the bound when the coordinator dies", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local c = coordinator(u, 2, { "-c", "4", "-d", "30", "-R", "400", t.url })
      wait_for(function() return t.count > 50 end, 15, "load")
      kill(c.pid)
      local killed = mw.now()
      procs[c.pid] = nil
      -- quiet for a second: the load stopped
      wait_for(function() return mw.now() - t.last > 1 end, 10, "the load to stop")
      local after = t.last - killed
      assert.is_true(after < 3.5, ("requests went on %.2fs after the coordinator died"):format(after))
      -- and the agents are alive, idle again
      for _, a in ipairs(list) do assert.is_true(alive(a.pid)) end
      local r = assert(redis.connect(u))
      wait_for(function()
        local s = r:get("mwbench:agent:agent1")
        return s ~= redis.null and serial.decode(s).state == "idle"
      end, 10, "agent1 idle")
      r:close()
      stop_agents(list)
      local agent_log = readfile(list[1].err)
      assert.matches("coordinator gone", agent_log)
      t.srv:close(0)
    end, 40)
  end)

  it("survives a Redis restart mid-test: agents keep recording and deliver", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local json = tmp(".json")
      local c = coordinator(u, 2, { "-c", "4", "-d", "4", "-R", "400", "--json", json, t.url })
      wait_for(function() return t.count > 100 end, 15, "load")
      mw.sleep(0.5)
      srv.kill()
      wait_for(function() return not alive(srv.pid) end, 5, "redis to die")
      mw.sleep(0.8)
      -- the same server again, on its port and directory; restart() takes the new pid from the
      -- server itself (the killed one's pid file is still there: taking the pid from it left
      -- the new server running after teardown)
      srv.restart()
      local code = wait(c, 40)
      stop_agents(list)
      assert.equal(0, code, context(c))
      local doc = json_decode(readfile(json))
      for _, a in ipairs(doc.agents) do assert.equal("ok", a.state) end
      -- every response the agents got is in the report: exact results, delivered after the restart
      assert.is_true(doc.requests >= t.count - 8 and doc.requests <= t.count,
        ("%d vs %d"):format(doc.requests, t.count))
      t.srv:close(0)
    end, 50)
  end)

  it("splits a scenario (setup once, stages, an HTTP and a WebSocket group) over three agents", function()
    run(function()
      local t = target()
      local u, list = agents(3)
      local sc = tmp(".lua")
      writefile(sc, ([[
local mw = require "moonwire"
local bench = require "moonwire.bench"
local BASE = %q
return {
  stages = { { duration = "1s", target = 6 }, { duration = "1s", target = 6 }, { duration = "0.5s", target = 0 } },
  thresholds = { "checks>99%%" },
  setup = function()
    local c = mw.http.client()
    local res = assert(c:get(BASE .. "setup"))
    res:body()
    return { path = "hello", ws = BASE:gsub("^http", "ws") .. "ws" }
  end,
  user = function(vu, data)
    if vu.id %% 2 == 0 then
      local ws = assert(mw.websocket.connect(data.ws, { local_host = vu.source }))
      for i = 1, 5 do
        local t0 = bench.now()
        ws:send("m" .. i)
        local msg = ws:receive()
        bench.check("echo", msg == "m" .. i)
        bench.trend("ws_rtt"):add((bench.now() - t0) * 1000)
        bench.counter("ws_msgs"):add(1)
      end
      ws:close()
    else
      local res = bench.http.get(BASE .. data.path)
      bench.check("status 200", res and res.status == 200)
    end
    bench.sleep(0.05)
  end,
}
]]):format(t.url))
      local json = tmp(".json")
      local c = coordinator(u, 3, { "--scenario", sc, "--json", json })
      local code = wait(c, 30)
      stop_agents(list)
      assert.equal(0, code, context(c))
      local doc = json_decode(readfile(json))
      assert.equal(1, t.setup)                     -- setup ran once, on the coordinator
      assert.equal(3, doc.threads)
      assert.equal(6, doc.max_users)
      assert.is_true(doc.metrics.ws_msgs.value > 0)
      assert.is_true(doc.metrics.http_reqs.value > 0)
      assert.equal(0, doc.checks.echo.fail)
      assert.is_true(doc.thresholds[1].pass)
      local iters = 0
      for _, a in ipairs(doc.agents) do
        assert.equal("ok", a.state)
        assert.is_true(a.requests > 0)
      end
      for _, a in ipairs(doc.agents) do iters = iters + a.requests end
      assert.equal(doc.metrics.http_reqs.value, iters)
      -- the WebSocket users and bench.http connected from their agent's source address:
      -- 127.0.0.1 made only the coordinator's setup request
      for i = 2, 4 do assert.is_true((t.by_source["127.0.0." .. i] or 0) > 0) end
      assert.equal(1, t.by_source["127.0.0.1"])
      t.srv:close(0)
    end, 40)
  end)

  it("marks a scenario agent killed mid-test as lost and keeps the intervals it sent", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local sc = tmp(".lua")
      writefile(sc, ([[
local bench = require "moonwire.bench"
return {
  users = 4, duration = "4s",
  user = function()
    local res = bench.http.get(%q)
    bench.check("status 200", res and res.status == 200)
    bench.trend("mine"):add(1)
    bench.sleep(0.05)
  end,
}
]]):format(t.url))
      local json = tmp(".json")
      local c = coordinator(u, 2, { "--scenario", sc, "--json", json })
      wait_for(function() return (t.by_source["127.0.0.3"] or 0) > 0 end, 15, "agent 2's load")
      mw.sleep(1.3)   -- at least one interval snapshot sent
      kill(list[2].pid)
      local killed = t.by_source["127.0.0.3"]
      local code, out = wait(c, 30)
      stop_agents(list)
      assert.equal(1, code, context(c))
      assert.matches("lost", out)
      local doc = json_decode(readfile(json))
      assert.equal("ok", doc.agents[1].state)
      assert.is_true(doc.agents[2].lost)
      local a2 = doc.agents[2].requests
      assert.is_true(a2 > 0, "its intervals are kept" .. context(c))
      -- what it reported was answered before it died
      assert.is_true(a2 <= killed, ("%d reported, %d served"):format(a2, killed))
      assert.equal(doc.metrics.http_reqs.value, doc.agents[1].requests + a2)
      -- every metric kind of its snapshots is merged: trends, counters, checks
      assert.equal(doc.metrics.http_reqs.value, doc.metrics.http_req_duration.count)
      assert.equal(doc.metrics.http_reqs.value, doc.metrics.mine.count)
      assert.equal(doc.metrics.http_reqs.value, doc.checks["status 200"].pass)
      assert.equal(0, doc.checks["status 200"].fail)
      assert.equal(4, doc.max_users)
      t.srv:close(0)
    end, 40)
  end)

  -- Regression: an agent's threads got wrk.thread.id = their index on that agent (1 on every
  -- agent), not the test-wide thread number one process with T threads gives them.
  it("gives wrk.thread.id the test-wide thread number on every agent", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local script = tmp(".lua")
      writefile(script, 'function init() wrk.path = "/id" .. wrk.thread.id end\n')
      local c = coordinator(u, 2, { "-c", "2", "-d", "1", "-s", script, t.url })
      local code = wait(c, 30)
      stop_agents(list)
      assert.equal(0, code, context(c))
      assert.is_true((t.by_path["/id1"] or 0) > 0, context(c))
      assert.is_true((t.by_path["/id2"] or 0) > 0, context(c))
      -- (no other path: no thread had another id)
      assert.equal(t.by_path["/id1"] + t.by_path["/id2"], t.count)
      t.srv:close(0)
    end, 40)
  end)

  -- Regression: wrk's own scripts/setup.lua crashed the coordinator with a traceback and
  -- no report: done() reads thread:get("requests"), but the coordinator's thread objects
  -- only knew what setup() had set (agents never sent their threads' globals back), and
  -- done() ran unprotected after the report, so the JSON was never written.
  local wrk_setup_lua = [[
local counter = 1
local threads = {}
function setup(thread)
   thread:set("id", counter)
   table.insert(threads, thread)
   counter = counter + 1
end
function init(args)
   requests  = 0
   responses = 0
end
function request()
   requests = requests + 1
   return wrk.request()
end
function response(status, headers, body)
   responses = responses + 1
end
function done(summary, latency, requests)
   for index, thread in ipairs(threads) do
      local id        = thread:get("id")
      local requests  = thread:get("requests")
      local responses = thread:get("responses")
      local msg = "thread %d made %d requests and got %d responses"
      print(msg:format(id, requests, responses))
   end
end
]]

  it("runs wrk's setup.lua: done() reads each agent thread's globals through thread:get", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local script, json = tmp(".lua"), tmp(".json")
      writefile(script, wrk_setup_lua)
      local c = coordinator(u, 2, { "-c", "2", "-d", "1", "-s", script, "--json", json, t.url })
      local code, out = wait(c, 30)
      stop_agents(list)
      assert.equal(0, code, context(c))
      local total = 0
      for id = 1, 2 do
        local req, resp = out:match("thread " .. id .. " made (%d+) requests and got (%d+) responses")
        assert.is_truthy(req, context(c))
        req, resp = tonumber(req), tonumber(resp)
        assert.is_true(resp > 0 and req >= resp, context(c))
        total = total + resp
      end
      local doc = json_decode(readfile(json))
      assert.equal(doc.requests, total)   -- the responses each thread counted are the report's
      t.srv:close(0)
    end, 40)
  end)

  -- Regression: a global that setup() set and the thread's script then set to nil was read
  -- back in done() as setup()'s value (wrk, and one process, read nil).
  it("thread:get in done(): a global the thread set to nil is nil, not setup()'s value", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local script = tmp(".lua")
      writefile(script, [[
local threads = {}
function setup(thread) thread:set("mark", "from setup") thread:set("kept", "kept") threads[#threads + 1] = thread end
function init() mark = nil end
function done()
  for i, th in ipairs(threads) do
    print("thread " .. i .. " " .. tostring(th:get("mark")) .. " " .. tostring(th:get("kept")))
  end
end
]])
      local c = coordinator(u, 2, { "-c", "2", "-d", "0.5", "-s", script, t.url })
      local code, out = wait(c, 30)
      stop_agents(list)
      assert.equal(0, code, context(c))
      assert.matches("thread 1 nil kept\n", out)
      assert.matches("thread 2 nil kept\n", out)
      t.srv:close(0)
    end, 40)
  end)

  it("writes the report and the JSON when done() fails, and exits 2 as one process does", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local script, json = tmp(".lua"), tmp(".json")
      writefile(script, 'function done() error("boom in done") end\n')
      local c = coordinator(u, 2, { "-c", "2", "-d", "1", "-s", script, "--json", json, t.url })
      local code, out, err = wait(c, 30)
      stop_agents(list)
      assert.equal(2, code, context(c))
      assert.matches("done%(%) failed: .*boom in done", err)
      assert.matches("Requests/sec:", out)
      local doc = json_decode(readfile(json) or "null")
      assert.is_true(type(doc) == "table" and doc.requests > 0, context(c))
      t.srv:close(0)
    end, 40)
  end)

  -- Regression: the coordinator had no SIGINT handler: Ctrl-C was ignored until the run's
  -- end and then every result was thrown away (exit 2). Now the agents stop at once and
  -- the report and the JSON cover what ran, as in one process.
  it("stops the agents on Ctrl-C and reports what ran", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local json = tmp(".json")
      local c = coordinator(u, 2, { "-c", "4", "-d", "20", "-R", "400", "--json", json, t.url })
      wait_for(function() return (t.by_source["127.0.0.2"] or 0) > 0 and (t.by_source["127.0.0.3"] or 0) > 0 end,
        15, "both agents' load")
      mw.sleep(0.5)
      kill(c.pid, "INT")
      local t0 = mw.now()
      local code, out, err = wait(c, 15)
      stop_agents(list)
      assert.equal(0, code, context(c))
      assert.is_true(mw.now() - t0 < 6, "the run stopped early")
      assert.matches("interrupted: the report covers what ran", err)
      assert.matches("Requests/sec:", out)
      local doc = json_decode(readfile(json) or "null")
      assert.is_true(type(doc) == "table", context(c))
      assert.is_true(doc.duration_s < 10)
      assert.equal(doc.requests, doc.agents[1].requests + doc.agents[2].requests)
      for _, a in ipairs(doc.agents) do
        assert.equal("stopped: stopped by the coordinator", a.state)
        assert.is_true(a.requests > 0)
      end
      t.srv:close(0)
    end, 40)
  end)

  -- Regression: a ready agent waited for the start with BLPOP ... 15 on a link whose client
  -- timeout was 10 s, so a barrier of 10-15 s (one agent slow to get ready) made it drop
  -- the job; the coordinator then started it anyway and waited 30 s for results.
  it("keeps a ready agent waiting through a barrier of more than 10 s", function()
    run(function()
      local t = target()
      local u, list = agents(1)
      local json = tmp(".json")
      local fa = fake_agent(u, "agent2")
      local c = coordinator(u, 2, { "-c", "2", "-d", "1", "--json", json, t.url })
      local job = fa.job(10)
      mw.sleep(11)                          -- agent1 is ready and waits for the start
      fa.event(job.run, "ready", { offset = 0, rtt = 0, threads = 1 })
      local go = fa.blpop("go", 10)
      assert.is_true(go ~= nil and go ~= redis.null, "the start signal")
      fa.event(job.run, "final", { results = {}, failures = {}, threads = 1 })
      fa.blpop("ack", 10)
      local code = wait(c, 25)
      fa.stop()
      stop_agents(list)
      assert.equal(0, code, context(c))
      local doc = json_decode(readfile(json))
      assert.equal("ok", doc.agents[1].state)
      assert.is_true(doc.agents[1].requests > 0)
      assert.is_nil(readfile(list[1].err):find("job dropped"))
      t.srv:close(0)
    end, 45)
  end)

  -- Regression: the coordinator never noticed that an agent which had taken the job went
  -- back to idle (it dropped it): it waited out the 15 s barrier (or 30 s for results).
  it("fails at once when an agent drops the job before the start", function()
    run(function()
      local u, list = agents(1)
      local fa = fake_agent(u, "agent2")
      local c = coordinator(u, 2, { "-c", "2", "-d", "1", "http://127.0.0.1:1/" })
      fa.job(10)
      mw.sleep(0.7)
      fa.info.state, fa.info.run = "idle", nil   -- as an agent that gave the job up
      local t0 = mw.now()
      local code, _, err = wait(c, 20)
      fa.stop()
      stop_agents(list)
      assert.equal(2, code, context(c))
      assert.is_true(mw.now() - t0 < 5, ("took %.1fs"):format(mw.now() - t0))
      assert.matches("agent2 dropped the job", err)
    end, 30)
  end)

  -- Regression: a lost agent's requests counted in the totals but not in the status
  -- counts, the timeline or Req/Sec (its pseudo results had statuses = {}, timeline = {}),
  -- and "no heartbeat for 0.7s" gave the time since its last interval, not its silence.
  it("reports a lost agent's requests consistently: statuses and timeline agree with the totals", function()
    run(function()
      local t = target()
      local u, list = agents(2)
      local json = tmp(".json")
      local c = coordinator(u, 2, { "-c", "4", "-d", "3", "-R", "400", "--json", json, t.url })
      wait_for(function() return (t.by_source["127.0.0.3"] or 0) > 0 end, 15, "agent 2's load")
      mw.sleep(1.6)   -- its first second's snapshot sent
      kill(list[2].pid)
      local code, _, err = wait(c, 30)
      stop_agents(list)
      assert.equal(1, code, context(c))
      local doc = json_decode(readfile(json))
      assert.is_true(doc.agents[2].lost)
      assert.is_true(doc.agents[2].requests > 0)
      local by_status = 0
      for _, v in pairs(doc.statuses) do by_status = by_status + v end
      assert.equal(doc.requests, by_status)
      -- both agents' first second: 200 req/s each (one agent alone is about 200)
      assert.is_true(doc.timeline[1].rps > 300, ("first second %.0f req/s"):format(doc.timeline[1].rps))
      local silence = tonumber(err:match("agent agent2 lost %(no heartbeat for ([%d.]+)s%)"))
      assert.is_truthy(silence, context(c))
      assert.is_true(silence >= 1.9, ("silence %.1fs is less than the heartbeat's TTL"):format(silence))
      t.srv:close(0)
    end, 40)
  end)

  -- Regression: a malformed job ('return 5', 'return {}') killed the agent process, and
  -- 'while true do end' made it spin forever (serial.decode was load() with no limit).
  it("keeps an agent alive through malformed jobs, then runs a real one", function()
    run(function()
      local t = target()
      local u, list = agents(1)
      local r = assert(redis.connect(u))
      wait_for(function() return r:call("GET", "mwbench:agent:agent1") ~= redis.null end, 10, "agent1's heartbeat")
      local payloads = { "garbage", "return 5", "return {}", "return {run=1}", "while true do end",
        "return {run=1,T=1,deadline_us=1e18,threads={{g=1}},kind='http'}" }
      for _, p in ipairs(payloads) do assert(r:call("RPUSH", "mwbench:agent:agent1:jobs", p)) end
      wait_for(function()
        local _, n = (readfile(list[1].err) or ""):gsub("bad job ignored", "")
        return n == #payloads
      end, 10, "every bad job logged")
      r:close()
      assert.is_true(alive(list[1].pid))
      local c = coordinator(u, 1, { "-c", "2", "-d", "1", t.url })
      local code = wait(c, 30)
      stop_agents(list)
      assert.equal(0, code, context(c))
      assert.is_true(t.count > 0)
      t.srv:close(0)
    end, 40)
  end)

  -- A run over one real agent and a fake one (agent2) that took its job, said it was ready
  -- and got the start signal: what the fake sends next is the test's.
  local function started_with_fake(json)
    local t = target()
    local u, list = agents(1)
    local fa = fake_agent(u, "agent2")
    local c = coordinator(u, 2, { "-c", "2", "-d", "1", "--json", json, t.url })
    local job = fa.job(10)
    fa.event(job.run, "ready", { offset = 0, rtt = 0, threads = 1 })
    local go = fa.blpop("go", 10)
    assert.is_true(go ~= nil and go ~= redis.null, "the start signal")
    return t, list, fa, c, job
  end

  -- Regression: the coordinator used interval and final events as they came: a malformed
  -- one raised inside its loop and the whole run was lost (exit 2, no report).
  it("ignores malformed intervals and treats an agent with malformed results as lost", function()
    run(function()
      local json = tmp(".json")
      local t, list, fa, c, job = started_with_fake(json)
      fa.event(job.run, "interval", "return {th='x'}", "garbage")
      fa.event(job.run, "interval", { th = 2, seq = 1, t = 1.0, n = 5, bytes = 10, errors = { nope = 1 } }, "garbage")
      fa.event(job.run, "interval", "while true do end", "garbage")
      fa.event(job.run, "final", { results = { 5 }, failures = {} })
      fa.blpop("ack", 10)
      local code, _, err = wait(c, 25)
      fa.stop()
      stop_agents(list)
      assert.equal(1, code, context(c))
      assert.matches("agent agent2 lost %(malformed results", err)
      local doc = json_decode(readfile(json) or "null")
      assert.is_true(type(doc) == "table", context(c))
      assert.equal("ok", doc.agents[1].state)
      assert.is_true(doc.agents[2].lost)
      assert.equal(0, doc.agents[2].requests)
      assert.equal(doc.requests, doc.agents[1].requests)
      t.srv:close(0)
    end, 40)
  end)

  -- a final whose results pass but whose other fields have wrong types (what the report
  -- prints and sums) raised in the coordinator after the run: a traceback, no report, no JSON
  it("treats an agent whose final has a badly typed field as lost, and still reports", function()
    run(function()
      local json = tmp(".json")
      local t, list, fa, c, job = started_with_fake(json)
      fa.event(job.run, "final", { results = {}, failures = {}, stopped = { "x" } })
      fa.blpop("ack", 10)
      local code, _, err = wait(c, 25)
      fa.stop()
      stop_agents(list)
      assert.equal(1, code, context(c))
      assert.matches("agent agent2 lost %(malformed results", err)
      assert.not_matches("traceback", err)
      local doc = json_decode(readfile(json) or "null")
      assert.is_true(type(doc) == "table", context(c))
      assert.is_true(doc.agents[2].lost)
      t.srv:close(0)
    end, 40)
  end)

  it("fails clearly when the agents do not come", function()
    run(function()
      db_next = db_next + 1
      local c = bg{ "--agents", "2", "--via", via(db_next), "--agent-wait", "1s", "http://127.0.0.1:1/" }
      local code, _, err = wait(c, 15)
      assert.equal(2, code)
      assert.matches("only 0 of 2 agents present after 1s", err)
      assert.not_matches("traceback", err)   -- one line, as the errors of one process
    end, 20)
  end)

  it("a Redis that cannot be reached: one line and exit 2, agent and coordinator alike", function()
    run(function()
      local dead = "redis://127.0.0.1:1/0"
      for _, args in ipairs{ { "--agent", dead, "-t1" }, { "--agents", "1", "--via", dead, "http://127.0.0.1:1/" } } do
        local code, _, err = wait(bg(args), 15)
        assert.equal(2, code)
        assert.matches("^moonwire bench: cannot connect to redis://127.0.0.1:1/0: [^\n]*\n$", err)
      end
    end, 40)
  end)
end)
