-- `moonwire bench` from the command line (docs/bench.md), run as a subprocess against test
-- servers this process serves on 127.0.0.1 port 0: counts and percentiles against a known
-- delay, error counting (refused, 500, silent server, unanswered requests), every wrk hook
-- through our own scripts in spec/wrk_scripts/, threshold exit codes, the JSON document
-- against the documented schema, the HTML report in headless Chromium, constant-rate
-- accuracy, coordinated omission, pipelining and the merging of several threads.
-- The CLI runs in the background (`shell`) and is polled from the loop, so the servers keep
-- serving. Runs are short (≤ 3 s) and every wait is bounded; timing assertions use wide
-- bands. A missing Chromium fails its test with what to do (scripts/install-peers).

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"
local core = require "moonwire.core"

local ROOT = (function()
  local p = assert(io.popen("pwd"))
  local dir = p:read("l")
  p:close()
  return dir
end)()
local SCRIPTS = ROOT .. "/spec/wrk_scripts/"
local CHROMIUM = "/usr/bin/chromium"

---------------------------------------------------------------------------------------------
-- files and processes

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local readfile = helper.readfile

local writefile = helper.writefile

local temps, tempdirs = {}, {}
local function tmp(suffix)
  local name = os.tmpname()
  temps[#temps + 1] = name
  if suffix then
    name = name .. suffix
    temps[#temps + 1] = name
  end
  return name
end

local function tmpdir()
  local name = os.tmpname()
  os.remove(name)
  assert(os.execute("mkdir -p " .. quote(name)))
  tempdirs[#tempdirs + 1] = name
  return name
end

local function cleanup()
  for _, name in ipairs(temps) do os.remove(name) end
  for _, dir in ipairs(tempdirs) do os.execute("rm -rf " .. quote(dir)) end
  temps, tempdirs = {}, {}
end

local shell = helper.shell

-- The `@name=value` lines our wrk scripts print from setup() and done().
local function kv(text)
  local t = {}
  for k, v in (text or ""):gmatch("@([%w_.]+)=([^\n]*)") do t[k] = v end
  return t
end

-- Runs `moonwire bench --quiet ARGS...` from the build tree under test (killed after `limit` seconds);
-- `env` adds environment variables. Returns { code, out, err, kv, context }.
local function bench(args, limit, env)
  limit = limit or 20
  local words = {}
  for i, a in ipairs(args) do words[i] = quote(a) end
  -- this process's module paths: the build tree under test (build-asan under make test-asan)
  local vars = { "LUA_PATH=" .. quote(package.path), "LUA_CPATH=" .. quote(package.cpath) }
  local preload = os.getenv("MW_ASAN_PRELOAD")   -- under `make test-asan`
  if preload then vars[#vars + 1] = "LD_PRELOAD=" .. quote(preload) end
  for k, v in pairs(env or {}) do vars[#vars + 1] = k .. "=" .. quote(v) end
  local cmd = ("env %s timeout -k 1 %d lua5.4 %s bench --quiet %s"):format(table.concat(vars, " "), limit,
    quote(ROOT .. "/bin/moonwire"), table.concat(words, " "))
  local code, out, err = shell(cmd, limit + 5)
  return { code = code, out = out or "", err = err or "", kv = kv(out),
    context = ("\n$ moonwire bench %s\nexit %s\n--- stdout:\n%s\n--- stderr:\n%s"):format(table.concat(words, " "),
      tostring(code), out, err) }
end

---------------------------------------------------------------------------------------------
-- a small JSON decoder: objects and arrays are told apart (metatables), null is kept

local NULL = setmetatable({}, { __tostring = function() return "null" end })
local ARRAY, OBJECT = { __name = "array" }, { __name = "object" }

local function json_decode(s)
  local pos = 1
  local function fail(msg)
    error(("invalid JSON (%s) at byte %d: %q"):format(msg, pos, s:sub(pos, pos + 30)), 0)
  end
  local function ws() pos = s:find("[^ \t\r\n]", pos) or #s + 1 end
  local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r",
    t = "\t" }
  local function str()
    pos = pos + 1
    local out = {}
    while true do
      local c = s:sub(pos, pos)
      if c == "" then fail("unterminated string") end
      if c == '"' then
        pos = pos + 1
        return table.concat(out)
      elseif c == "\\" then
        local e = s:sub(pos + 1, pos + 1)
        if ESCAPES[e] then
          out[#out + 1] = ESCAPES[e]
          pos = pos + 2
        elseif e == "u" and s:sub(pos + 2, pos + 5):match("^%x%x%x%x$") then
          out[#out + 1] = utf8.char(tonumber(s:sub(pos + 2, pos + 5), 16))
          pos = pos + 6
        else
          fail("bad escape")
        end
      elseif c:byte() < 32 then
        fail("control character in a string")
      else
        out[#out + 1] = c
        pos = pos + 1
      end
    end
  end
  local value
  local function list(close, obj)
    pos = pos + 1
    local t = setmetatable({}, obj and OBJECT or ARRAY)
    ws()
    if s:sub(pos, pos) == close then
      pos = pos + 1
      return t
    end
    while true do
      ws()
      if obj then
        if s:sub(pos, pos) ~= '"' then fail("a key expected") end
        local k = str()
        ws()
        if s:sub(pos, pos) ~= ":" then fail("':' expected") end
        pos = pos + 1
        if t[k] ~= nil then fail("duplicate key " .. k) end
        t[k] = value()
      else
        t[#t + 1] = value()
      end
      ws()
      local d = s:sub(pos, pos)
      pos = pos + 1
      if d == close then return t end
      if d ~= "," then fail("',' or '" .. close .. "' expected") end
    end
  end
  function value()
    ws()
    local c = s:sub(pos, pos)
    if c == "{" then return list("}", true) end
    if c == "[" then return list("]", false) end
    if c == '"' then return str() end
    for word, v in pairs{ ["true"] = true, ["false"] = false, null = NULL } do
      if s:sub(pos, pos + #word - 1) == word then
        pos = pos + #word
        return v
      end
    end
    local text = s:match("^-?%d+", pos)
    if not text or text:match("^-?0%d") then fail("a value expected") end
    local frac = s:match("^%.%d+", pos + #text)
    if frac then text = text .. frac end
    local exp = s:match("^[eE][-+]?%d+", pos + #text)
    if exp then text = text .. exp end
    pos = pos + #text
    return tonumber(text)
  end
  local v = value()
  ws()
  if pos <= #s then fail("trailing text") end
  return v
end

local function jkind(v)
  if v == NULL then return "null" end
  local t = type(v)
  if t == "table" then return getmetatable(v) == ARRAY and "array" or "object" end
  if t == "number" then return math.type(v) == "integer" and "integer" or "number" end
  return t
end

-- Checks `v` against a schema: a type name ("integer", "number" (integers too), "string",
-- "boolean", "object", "array", "absent" (the field may be missing), "a|b"), a table of
-- fields (an object with at least those), or { each = schema } (an array whose items all
-- match). Problems go into `out`.
local function conform(v, schema, path, out)
  if type(schema) == "string" then
    local k = jkind(v)
    for want in schema:gmatch("[^|]+") do
      if want == k or (want == "number" and k == "integer") then return end
    end
    if v == nil and schema:match("absent") then return end
    out[#out + 1] = ("%s: %s expected, got %s (%s)"):format(path, schema, v == nil and "nothing" or k, tostring(v))
  elseif schema.each then
    if jkind(v) ~= "array" then
      out[#out + 1] = ("%s: array expected, got %s"):format(path, v == nil and "nothing" or jkind(v))
      return
    end
    for i, x in ipairs(v) do conform(x, schema.each, ("%s[%d]"):format(path, i), out) end
  else
    if jkind(v) ~= "object" then
      out[#out + 1] = ("%s: object expected, got %s"):format(path, v == nil and "nothing" or jkind(v))
      return
    end
    for k, sub in pairs(schema) do conform(v[k], sub, path .. "." .. k, out) end
  end
end

-- docs/bench.md, "The JSON document"
local SCHEMA = {
  url = "string", threads = "integer", connections = "integer", duration_s = "number", rate = "number|null",
  pipeline = "integer", requests = "integer", bytes = "integer", rps = "number", hung = "integer",
  errors = { connect = "integer", read = "integer", write = "integer", status = "integer", timeout = "integer" },
  statuses = "object",
  latency_us = { min = "number", max = "number", mean = "number", stdev = "number",
    percentiles = { ["50"] = "number", ["75"] = "number", ["90"] = "number", ["95"] = "number", ["99"] = "number",
      ["99.9"] = "number", ["99.99"] = "number", ["99.999"] = "number" } },
  requests_per_thread_per_s = { mean = "number", stdev = "number", max = "number" },
  timeline = { each = { t = "number", rps = "number", p50 = "number", p99 = "number", max = "number",
    errors = "integer" } },
  thresholds = { each = { expr = "string", pass = "boolean", message = "string" } },
}

---------------------------------------------------------------------------------------------
-- test servers (in this process)

local handler_errors = {}

local function serve(handler)
  handler_errors = {}
  return assert(http.server{ host = "127.0.0.1", port = 0, handler = handler,
    error_log = function(msg) handler_errors[#handler_errors + 1] = msg end })
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

local function url(srv, path)
  return ("http://127.0.0.1:%d%s"):format(srv.port, path or "/")
end

-- A raw HTTP/1.1 server: answer(sock) once for each request head it reads (a false result
-- ends the connection). -> port, a to-be-closed value that stops it.
local function raw_server(answer)
  local l, port = helper.listen()
  local acceptor = mw.spawn(function()
    while true do
      local s = l:accept()
      if not s then return end
      mw.spawn(function()
        while true do
          local line = s:read("l", 5)
          if not line then return end
          if line == "" and not answer(s) then return end
        end
      end)
    end
  end)
  return port, setmetatable({}, { __close = function() acceptor:cancel() l:close() end })
end

-- A server that accepts, reads, and never answers.
local function silent_server()
  local l, port = helper.listen()
  local socks = {}
  local acceptor = mw.spawn(function()
    while true do
      local s = l:accept()
      if not s then return end
      socks[#socks + 1] = s
      mw.spawn(function() s:read("a") end)
    end
  end)
  return port, setmetatable({}, { __close = function()
    acceptor:cancel()
    l:close()
    for _, s in ipairs(socks) do s:close() end
  end })
end

-- Results of a run shared by several tests (computed by the first that needs it).
local function once(fn)
  local value
  return function()
    if value == nil then value = fn() end
    return value
  end
end

local function json_of(r, path)
  local text = path and readfile(path) or r.out
  assert.is_truthy(text and text ~= "", "no JSON written" .. r.context)
  local ok, doc = pcall(json_decode, text)
  assert(ok, tostring(doc) .. r.context)
  return doc
end

local function between(lo, hi, v, what)
  assert.is_true(type(v) == "number" and v >= lo and v <= hi,
    ("%s: %s not within [%s, %s]"):format(what, tostring(v), tostring(lo), tostring(hi)))
end

after_each(cleanup)

---------------------------------------------------------------------------------------------
-- a server that answers every request after 20 ms: -t2 -c10 -d2s, JSON and HTML, thresholds

-- Holds the request for at least `s` seconds of real time (mw.sleep counts from the loop's
-- cached time, which can be older than now when this process was preempted).
local function hold(s)
  local deadline = core.hrtime() + math.floor(s * 1e9)
  while true do
    local left = deadline - core.hrtime()
    if left <= 0 then return end
    mw.sleep(left / 1e9)
  end
end

local delayed = once(function()
  local srv = serve(function(_, res)
    hold(0.02)
    res:header("content-type", "text/plain")
    res:send("delayed response\n")
  end)
  local _g <close> = guard(srv)
  local json, html = tmp(".json"), tmp(".html")
  local r = bench({ "-t2", "-c10", "-d2s", "--latency", "--json", json, "--html", html,
    "--threshold", "p50<1s", "--threshold", "errors<1%", url(srv) }, 20)
  r.json_text, r.html = readfile(json), readfile(html)
  r.doc = json_of(r, json)
  return r
end)

describe("bench: counts and percentiles against a server answering after 20 ms", function()
  it("p50 is the server's delay, requests ≈ connections × duration / 20 ms, wrk's text layout", function()
    run(function()
      local r = delayed()
      assert.equal(0, r.code, r.context)
      local d = r.doc
      local p50 = d.latency_us.percentiles["50"]
      between(19500, 30000, p50, "p50 (µs)" .. r.context)
      between(19000, 60000, d.latency_us.min, "min (µs)")
      assert.is_true(d.latency_us.max >= p50 and d.latency_us.percentiles["99"] >= p50)
      -- 10 connections for 2 s, each request ≥ 20 ms: at most 1000 (+ the last in flight)
      between(600, 1010, d.requests, "requests" .. r.context)
      between(300, 505, d.rps, "req/s")
      assert.equal(d.requests, d.statuses["200"])
      assert.same({ connect = 0, read = 0, write = 0, status = 0, timeout = 0 },
        setmetatable(d.errors, nil))
      -- wrk's layout
      local out = r.out
      assert.matches("Running 2s test @ " .. d.url .. "\n", out, 1, true)
      assert.matches("  2 threads and 10 connections\n", out, 1, true)
      assert.matches("Thread Stats   Avg      Stdev     Max   +/- Stdev", out, 1, true)
      assert.matches("\n    Latency +[%d.]+ms", out)
      assert.matches("\n    Req/Sec ", out)
      assert.matches("Latency Distribution\n     50%% +[%d.]+ms\n     75%%", out)
      assert.matches("HDR Percentiles\n   99%.900%%", out)
      assert.matches("\n  " .. d.requests .. " requests in 2%.%d%ds, [%d.]+KB read\n", out)
      assert.matches("\nRequests/sec: +[%d.]+\nTransfer/sec: +[%d.]+KB\n", out)
      assert.not_matches("Socket errors", out)
      assert.not_matches("Non%-2xx", out)
    end, 30)
  end)

  it("the timeline has one entry a second, in order, with p50 near the delay", function()
    run(function()
      local r = delayed()
      local tl = r.doc.timeline
      assert.equal("array", jkind(tl), r.json_text)
      assert.is_true(#tl >= 1, "no timeline" .. r.context)
      local prev = 0
      for i, e in ipairs(tl) do
        assert.is_true(e.t > prev, "timeline out of order: " .. r.json_text)
        prev = e.t
        between(19500, 30000, e.p50, "timeline p50")
        assert.is_true(e.p99 >= e.p50 and e.max >= e.p99)
        if i < #tl then between(250, 550, e.rps, "timeline rps") end   -- the last may be a part of a second
        assert.equal(0, e.errors)
      end
      -- a 2 s run: two seconds, two entries (the last second neither dropped nor counted twice)
      assert(#tl == 2, ("%d timeline entries for a 2 s run: %s"):format(#tl, r.json_text))
    end, 30)
  end)

  it("a healthy server leaves no request reported unanswered at the end", function()
    -- the requests in flight at the deadline are answered 20 ms later: they are not the
    -- requests 'that never get an answer' the hung count exists for (wrk#297)
    run(function()
      local r = delayed()
      assert.equal(0, r.doc.hung, "hung on a healthy server" .. r.context)
      assert.not_matches("without an answer", r.out)
    end, 30)
  end)
end)

---------------------------------------------------------------------------------------------
-- errors

describe("bench: error counting", function()
  it("connection refused: connect errors, no requests", function()
    run(function()
      local port = helper.free_port()
      local r = bench({ "-t1", "-c2", "-d0.5s", "--json", "-", ("http://127.0.0.1:%d/"):format(port) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.is_true(d.errors.connect >= 2, "connect errors: " .. d.errors.connect .. r.context)
      assert.equal(0, d.requests)
      assert.equal(0, d.errors.read + d.errors.write + d.errors.timeout + d.errors.status)
      -- with --json -, wrk's text goes to stderr
      assert.matches("Socket errors: connect " .. d.errors.connect .. ", read 0, write 0, timeout 0", r.err, 1, true)
      assert.matches("  0 requests in ", r.err, 1, true)
    end, 20)
  end)

  -- Regression: the threads were joined in order, so a thread that failed while another
  -- ran was reported only once that one had run its whole duration; and a CLI that gave up
  -- on the run could free the shared counters those still running threads wrote to. Now
  -- the first failure stops the others at once and is reported once every thread ended.
  it("a thread that fails while another runs: the run stops at once, exit 2 naming the thread", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _ <close> = guard(srv)
      local script = writefile(tmp(".lua"), [[
function init()
  if wrk.thread.id == 2 then error("boom in thread 2") end
end
]])
      local t0 = mw.now()
      local r = bench({ "-t2", "-c2", "-d6s", "-s", script, url(srv) }, 20)
      local took = mw.now() - t0
      assert.equal(2, r.code, r.context)
      assert.matches("thread 2 failed: [^\n]*boom in thread 2", r.err)
      assert.is_true(took < 4, ("the CLI ran %.1f s of a 6 s run after thread 2 failed"):format(took) .. r.context)
      cleanup()
    end, 30)
  end)

  -- Regression (found by review): --source was passed on by agents only; a local run took
  -- it and connected from the default address
  it("--source binds a local run's connections (HTTP/1.1 and --h2)", function()
    run(function()
      local peers = {}
      local srv = serve(function(req, res)
        peers[req.remote_addr] = (peers[req.remote_addr] or 0) + 1
        res:send("ok")
      end)
      local _ <close> = guard(srv)
      for _, extra in ipairs { {}, { "--h2" } } do
        peers = {}
        local args = { "-t1", "-c2", "-d0.3s", "--source", "127.0.0.2" }
        for _, a in ipairs(extra) do args[#args + 1] = a end
        args[#args + 1] = url(srv)
        local r = bench(args, 20)
        assert.equal(0, r.code, r.context)
        assert.is_true((peers["127.0.0.2"] or 0) > 0, r.context)
        assert.is_nil(peers["127.0.0.1"], r.context)
      end
      cleanup()
    end, 30)
  end)

  -- a request written and then dropped (the server closes without answering) is lost: it
  -- counts as a read error (as wrk counts it), however many answers came before
  it("a server that closes without answering: each dropped request is a read error", function()
    run(function()
      local l, port = helper.listen()
      local served = 0
      local acceptor = mw.spawn(function()
        while true do
          local s = l:accept()
          if not s then return end
          mw.spawn(function()
            local head = s:read("l", 5)
            while head and head ~= "" do head = s:read("l", 5) end
            served = served + 1
            if served <= 20 and head then s:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") end
            s:close()                        -- (keep-alive said, and closed: the next request is lost)
          end)
        end
      end)
      local _ <close> = setmetatable({}, { __close = function() acceptor:cancel() l:close() end })
      local r = bench({ "-t1", "-c2", "-d0.5s", "--json", "-", "--threshold", "errors<1%",
        ("http://127.0.0.1:%d/"):format(port) })
      assert.equal(1, r.code, r.context)                -- the threshold fails
      local d = json_of(r)
      assert.equal(20, d.requests, r.context)
      assert.is_true(d.errors.read >= 20, "read errors: " .. d.errors.read .. r.context)
    end, 20)
  end)

  it("-m HEAD: answers without a body are read as such (no timeouts)", function()
    run(function()
      local methods = {}
      local srv = serve(function(req, res)
        methods[req.method] = (methods[req.method] or 0) + 1
        res:send("hi")                         -- Content-Length: 2, no body for HEAD
      end)
      local _ <close> = guard(srv)
      local r = bench({ "-t1", "-c2", "-d0.5s", "--timeout", "0.3s", "-m", "HEAD", "--json", "-", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.is_true(d.requests > 20, d.requests .. " requests" .. r.context)
      assert.equal(0, d.errors.timeout + d.errors.read, r.context)
      assert.is_nil(methods.GET)
    end, 20)
  end)

  it("Ctrl-C ends the run early with the report and the JSON of what ran", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _ <close> = guard(srv)
      local json = tmp(".json")
      local words = { "env", "LUA_PATH=" .. quote(package.path), "LUA_CPATH=" .. quote(package.cpath) }
      local preload = os.getenv("MW_ASAN_PRELOAD")
      if preload then words[#words + 1] = "LD_PRELOAD=" .. quote(preload) end
      local t0 = mw.now()
      local code, out, err = shell(("%s timeout --preserve-status -s INT 1 lua5.4 %s bench --quiet -t2 -c4 -d20s "
        .. "--json %s %s"):format(table.concat(words, " "), quote(ROOT .. "/bin/moonwire"), quote(json), url(srv)), 25)
      local took = mw.now() - t0
      assert.is_true(took < 8, ("a 20 s run went on %.1f s after Ctrl-C"):format(took))
      assert.equal(0, code, tostring(err))
      assert.matches("requests in ", out)
      assert.matches("interrupted", err)
      local d = json_of({ context = err }, json)
      assert.is_true(d.requests > 0)
      assert.is_true(d.duration_s < 5, "duration " .. tostring(d.duration_s))
    end, 30)
  end)

  it("a request(), response() or delay() hook that raises stops the run: exit 2 with its error, once", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _ <close> = guard(srv)
      for _, hook in ipairs { "response", "request", "delay" } do
        local script = writefile(tmp(".lua"), ("function %s() error('boom in %s') end"):format(hook, hook))
        local t0 = mw.now()
        local r = bench({ "-t2", "-c8", "-d5s", "-s", script, url(srv) }, 20)
        assert.equal(2, r.code, r.context)
        assert.matches("thread %d failed: [^\n]*boom in " .. hook, r.err)
        local _, n = r.err:gsub("boom in", "")
        assert.is_true(n <= 2, n .. " reports of the error" .. r.context)
        assert.is_true(mw.now() - t0 < 4, "the run went on" .. r.context)
      end
    end, 60)
  end)

  -- Regression: in one process a done() that raised ended the run with exit 2 and nothing
  -- else: no thresholds, no JSON, no HTML (a distributed run wrote them, as documented).
  it("a done() that raises: exit 2, yet the thresholds are judged and the JSON and HTML written", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _ <close> = guard(srv)
      local script = writefile(tmp(".lua"), "function done() error('boom in done') end")
      local json, html = tmp(".json"), tmp(".html")
      local r = bench({ "-t1", "-c2", "-d0.3s", "-s", script, "--json", json, "--html", html,
        "--threshold", "requests>0", url(srv) })
      assert.equal(2, r.code, r.context)
      assert.matches("done%(%) failed: [^\n]*boom in done", r.err)
      assert.matches("PASS requests>0", r.out, 1, true)
      local d = json_of(r, json)
      assert.is_true(d.requests > 0, r.context)
      assert.equal("requests>0", d.thresholds[1].expr)
      assert.matches("<html", readfile(html) or "", 1, true)
    end, 20)
  end)

  it("a server answering 500: every response is a status error (Non-2xx), errors.status in JSON", function()
    run(function()
      local srv = serve(function(_, res)
        res:status(500)
        res:send("no")
      end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c2", "-d0.5s", "--json", "-", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.is_true(d.requests > 10, r.context)
      assert.equal(d.requests, d.errors.status)
      assert.equal(d.requests, d.statuses["500"])
      assert.is_nil(d.statuses["200"])
      assert.equal(0, d.errors.connect + d.errors.read + d.errors.write + d.errors.timeout)
      assert.matches("Non-2xx or 3xx responses: " .. d.requests .. "\n", r.err, 1, true)
    end, 20)
  end)

  -- 1xx responses before the final one (here 103 Early Hints) are not answers: counted,
  -- the bench would report twice the requests the server answered
  it("a server sending 103 Early Hints before each 200: only the 200s count", function()
    run(function()
      local answered = 0
      local srv = serve(function(req, res)
        assert(req.socket:write("HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"))
        answered = answered + 1
        res:send("ok")
      end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c2", "-d0.5s", "--json", "-", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.is_true(d.requests > 10, r.context)
      assert.is_nil(d.statuses["103"], r.context)
      assert.equal(d.requests, d.statuses["200"], r.context)
      assert.is_true(d.requests <= answered, ("%d requests counted, %d answered"):format(d.requests, answered)
        .. r.context)
      assert.equal(0, d.errors.status + d.errors.read, r.context)
      -- and with a response() hook (which reads whole responses): the 103s never reach it
      answered = 0
      local json = tmp(".json")
      r = bench({ "-t1", "-c2", "-d0.5s", "--json", json, "-s", SCRIPTS .. "response.lua", url(srv) })
      assert.equal(0, r.code, r.context)
      d = json_of(r, json)
      assert.is_nil(d.statuses["103"], r.context)
      assert.equal(d.requests, d.statuses["200"], r.context)
      assert.equal(d.requests, tonumber(r.kv.sum), r.context)
      assert.is_true(d.requests <= answered, r.context)
    end, 20)
  end)

  it("a server that never answers: timeouts with --timeout 0.3s, and the requests unanswered at the end", function()
    run(function()
      local port, _close <close> = silent_server()
      local r = bench({ "-t1", "-c2", "-d1.5s", "--timeout", "0.3s", "--json", "-",
        ("http://127.0.0.1:%d/"):format(port) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.equal(0, d.requests)
      -- each connection times out every 0.3 s (then reconnects): 4 or 5 times in 1.5 s
      between(4, 10, d.errors.timeout, "timeouts" .. r.context)
      assert.equal(0, d.errors.connect + d.errors.read + d.errors.write)
      -- and at the end each connection still waits for an answer
      assert.equal(2, d.hung, r.context)
      assert.matches("Socket errors: connect 0, read 0, write 0, timeout " .. d.errors.timeout, r.err, 1, true)
      assert.matches("Requests without an answer at the end: 2\n", r.err, 1, true)
      -- pipelined: every request of each batch is unanswered, not one per connection
      r = bench({ "-t1", "-c2", "-d0.5s", "--timeout", "5s", "--pipeline", "4", "--json", "-",
        ("http://127.0.0.1:%d/"):format(port) })
      assert.equal(8, json_of(r).hung, r.context)
    end, 20)
  end)


  -- --timeout bounds a whole answer, head and body, with a response() hook as without
  it("--timeout covers the head and the body together, with a response() hook too", function()
    run(function()
      local port, _ <close> = raw_server(function(s)
        -- the head after 0.3 s, the body 0.3 s after it: each within the 0.4 s timeout, the
        -- whole answer not
        mw.sleep(0.3)
        s:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        mw.sleep(0.3)
        return s:write("ok")
      end)
      local script = writefile(tmp(".lua"), "function response() end")
      for _, args in ipairs { {}, { "-s", script } } do
        local words = { "-t1", "-c1", "-d1.5s", "--timeout", "0.4s", "--json", "-" }
        for _, a in ipairs(args) do words[#words + 1] = a end
        words[#words + 1] = ("http://127.0.0.1:%d/"):format(port)
        local d = json_of(bench(words))
        assert.equal(0, d.requests)
        assert.is_true(d.errors.timeout >= 2, table.concat(args, " ") .. ": timeouts " .. d.errors.timeout)
      end
    end, 30)
  end)

  -- Transfer/sec is the bytes read, as wrk counts them: heads, interim responses and chunked
  -- framing included, with a response() hook as without (with one, only bodies were counted)
  it("bytes are what was read, with a response() hook too", function()
    run(function()
      local answer = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" ..
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
      local port, _ <close> = raw_server(function(s) return s:write(answer) end)
      local script = writefile(tmp(".lua"), "function response(status, headers, body) end")
      for _, args in ipairs { {}, { "-s", script } } do
        local words = { "-t1", "-c1", "-d0.5s", "--json", "-" }
        for _, a in ipairs(args) do words[#words + 1] = a end
        words[#words + 1] = ("http://127.0.0.1:%d/"):format(port)
        local r = bench(words)
        local d = json_of(r)
        assert.is_true(d.requests > 0, r.context)
        assert.equal(#answer * d.requests, d.bytes, table.concat(args, " ") .. r.context)
      end
    end, 30)
  end)
end)


---------------------------------------------------------------------------------------------
-- wrk scripts

describe("bench: wrk scripts (spec/wrk_scripts)", function()
  local setup_init = once(function()
    local paths = {}
    local srv = serve(function(req, res)
      paths[req.path] = (paths[req.path] or 0) + 1
      res:send("ok")
    end)
    local _g <close> = guard(srv)
    local r = bench({ "-t2", "-c4", "-d0.5s", "-s", SCRIPTS .. "setup_init.lua", url(srv), "--", "one", "two words" })
    r.paths, r.url = paths, url(srv)
    return r
  end)

  it("setup() sets thread globals with thread:set; init() sees them and gets the words after --", function()
    run(function()
      local r = setup_init()
      assert.equal(0, r.code, r.context)
      local k = r.kv
      assert.equal("2", k.threads, r.context)
      for i = 1, 2 do
        assert.equal("t" .. i, k[i .. ".tag"], r.context)
        assert.equal("one,two words", k[i .. ".args"], r.context)
        assert.equal("2", k[i .. ".count"], r.context)
        assert.equal(i .. "/b/true/0.5", k[i .. ".cfg"], r.context)   -- a table, copied
        assert.equal("127.0.0.1:" .. r.url:match(":(%d+)/"), k[i .. ".addr"], r.context)
      end
      -- init() set wrk.path from the thread's global: the request built after it went out
      assert.is_true((r.paths["/t1"] or 0) > 0 and (r.paths["/t2"] or 0) > 0,
        "paths seen: " .. require("moonwire.bench.serial").encode(r.paths))
      assert.is_nil(r.paths["/"])
    end, 30)
  end)

  -- Regression: "Running 1s test @ URL" and the threads line were printed with the report,
  -- after the run; wrk prints them before it starts (here: before any response() output).
  it("wrk's header lines come before the run", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      local script = writefile(tmp(".lua"), [[
local said = false
function response() if not said then said = true io.write("@response\n") io.flush() end end
]])
      local r = bench({ "-t1", "-c1", "-d0.3s", "-s", script, url(srv) })
      assert.equal(0, r.code, r.context)
      local running, first = r.out:find("Running 300ms test @ ", 1, true), r.out:find("@response", 1, true)
      assert.is_truthy(running and first, r.context)
      assert.is_true(running < first, "the header came after the run" .. r.context)
    end, 20)
  end)

  it("init(args) gets the URL as args[0], as wrk gives it", function()
    run(function()
      local r = setup_init()
      assert.equal(r.url, r.kv["1.url"], "args[0] in init()" .. r.context)
    end, 30)
  end)

  it("delay() slows the requests down, and is not counted in the latency", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c2", "-d1s", "--json", "-", "-s", SCRIPTS .. "delay.lua", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      -- 2 connections, 50 ms before each request, for 1 s: about 40 (without delay: thousands)
      between(10, 60, d.requests, "requests" .. r.context)
      assert.is_true(d.latency_us.percentiles["50"] < 25000, "the delay leaked into the latency" .. r.context)
    end, 20)
  end)

  it("delay() returning a string: a number as wrk reads it (\"50\" is 50 ms, anything else none)", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      for _, case in ipairs{ { '"50"', 5, 30 }, { '"soon"', 100, math.huge } } do
        for _, h2 in ipairs{ false, true } do
          local script = writefile(tmp(".lua"), "function delay() return " .. case[1] .. " end")
          local args = { "-t1", "-c1", "-d1s", "--json", "-", "-s", script, url(srv) }
          if h2 then table.insert(args, 1, "--h2") end
          local r = bench(args)
          assert.equal(0, r.code, r.context)
          assert.not_matches("error", r.err)
          between(case[2], case[3], json_of(r).requests, "requests, delay " .. case[1] .. r.context)
        end
      end
    end, 30)
  end)

  it("request() returning two wrk.format requests pipelines them; each response counts", function()
    run(function()
      local seen, problems, last_a = { a = 0, b = 0 }, {}, nil
      local srv
      srv = serve(function(req, res)
        local host = req.headers.host
        if host ~= "127.0.0.1:" .. srv.port then problems[#problems + 1] = "Host: " .. tostring(host) end
        if req.path == "/a" then
          seen.a = seen.a + 1
          if req.method ~= "GET" then problems[#problems + 1] = "/a method " .. req.method end
          if req.headers["content-length"] then problems[#problems + 1] = "Content-Length on a GET" end
          last_a = req.query_string
        elseif req.path == "/b" then
          seen.b = seen.b + 1
          local n = req.headers["x-seq"]
          local body = req:body()
          if req.method ~= "POST" then problems[#problems + 1] = "/b method " .. req.method end
          if body ~= "payload-" .. tostring(n) then problems[#problems + 1] = "/b body " .. tostring(body) end
          -- one connection: /b n follows /a?i=n (the pair was written together, in order)
          if last_a ~= "i=" .. tostring(n) then
            problems[#problems + 1] = ("/b %s after /a?%s"):format(tostring(n), tostring(last_a))
          end
        else
          problems[#problems + 1] = "path " .. req.path
        end
        res:send("ok")
      end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c1", "-d0.5s", "--json", "-", "-s", SCRIPTS .. "pipeline.lua", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.same({}, problems)
      assert.is_true(seen.a > 10, r.context)
      assert.is_true(seen.b == seen.a or seen.b == seen.a - 1, ("a %d, b %d"):format(seen.a, seen.b))
      -- every response counted: what the server answered, less what was in flight at the end
      assert.is_true(d.requests <= seen.a + seen.b and d.requests >= seen.a + seen.b - 2,
        ("client counted %d, server answered %d"):format(d.requests, seen.a + seen.b))
    end, 20)
  end)

  local responses = once(function()
    local srv = serve(function(_, res)
      res:status(201)
      res:header("X-Token", "tok-123")
      res:send("response-body")
    end)
    local _g <close> = guard(srv)
    local json = tmp(".json")
    local r = bench({ "-t3", "-c6", "-d1s", "--json", json, "-s", SCRIPTS .. "response.lua", url(srv) })
    r.doc = json_of(r, json)
    return r
  end)

  it("response() sees status, headers and body; thread:get in done() reads its counters", function()
    run(function()
      local r = responses()
      assert.equal(0, r.code, r.context)
      local k = r.kv
      assert.equal("3", k.threads, r.context)
      for i = 1, 3 do
        assert.is_true(tonumber(k[i .. ".responses"]) > 0, r.context)
        assert.equal("201", k[i .. ".status"], r.context)
        assert.equal("table", k[i .. ".headers_type"], r.context)
        assert.equal("tok-123", k[i .. ".token"], r.context)
        assert.equal("response-body", k[i .. ".body"], r.context)
      end
      assert.equal(r.doc.requests, tonumber(k.sum), r.context)
    end, 30)
  end)

  it("response() gets the header names as the server sent them (headers[\"X-Token\"], as in wrk)", function()
    run(function()
      local r = responses()
      assert.equal("tok-123", r.kv["1.token_as_sent"], "headers[\"X-Token\"] in response()" .. r.context)
    end, 30)
  end)

  it("-t3 merges exactly: the threads' counts sum to the total, one latency sample per request", function()
    run(function()
      local r = responses()
      local k, d = r.kv, r.doc
      local sum = 0
      for i = 1, 3 do sum = sum + tonumber(k[i .. ".responses"]) end
      assert.equal(d.requests, sum, r.context)
      assert.equal(d.requests, tonumber(k.requests), r.context)
      assert.equal(d.requests, tonumber(k.latency_samples), r.context)
      assert.equal(d.requests, d.statuses["201"])
      assert.equal(3, d.threads)
    end, 30)
  end)

  it("done() gets summary, latency and requests: fields, percentile(), latency(i), #latency", function()
    run(function()
      local srv = serve(function(_, res) res:send("done test") end)
      local _g <close> = guard(srv)
      local json = tmp(".json")
      local r = bench({ "-t2", "-c4", "-d1s", "--latency", "--json", json, "-s", SCRIPTS .. "done.lua", url(srv) })
      assert.equal(0, r.code, r.context)
      local d, k = json_of(r, json), r.kv
      local function n(name) return tonumber(k[name]) end
      assert.is_true(math.abs(n("duration") - d.duration_s * 1e6) < 100, r.context)
      assert.equal(d.requests, n("requests"), r.context)
      assert.equal(d.bytes, n("bytes"))
      for _, e in ipairs{ "connect", "read", "write", "status", "timeout" } do assert.equal(0, n("errors." .. e)) end
      local lat = d.latency_us
      assert.equal(lat.min, n("latency.min"))
      assert.equal(lat.max, n("latency.max"))
      assert.is_true(math.abs(lat.mean - n("latency.mean")) <= 1e-4 * lat.mean + 1e-3)
      assert.is_true(math.abs(lat.stdev - n("latency.stdev")) <= 1e-4 * lat.stdev + 1e-3)
      assert.equal(lat.percentiles["50"], n("latency.p50"))
      assert.equal(lat.percentiles["99"], n("latency.p99"))
      assert.equal(lat.percentiles["99.999"], n("latency.p99.999"))
      -- buckets: #latency of them, ascending, counts summing to the requests
      assert.is_true(n("latency.buckets") >= 1 and n("latency.buckets") <= d.requests)
      assert.equal("true", k["latency.sorted"])
      assert.equal(d.requests, n("latency.samples"))
      assert.is_true(n("latency.first_value") >= lat.min and n("latency.first_count") >= 1)
      assert.equal(lat.max, n("latency.last_value"))
      -- requests: the per-thread req/s samples
      local rq = d.requests_per_thread_per_s
      assert.is_true(math.abs(rq.mean - n("requests.mean")) <= 1e-4 * rq.mean + 1e-3)
      assert.equal(rq.max, n("requests.max"))
      assert.is_true(n("requests.buckets") >= 1 and n("requests.p50") > 0)
    end, 20)
  end)

  it("wrk.lookup and wrk.connect in setup(); thread.addr chooses where a thread connects", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      local closed = helper.free_port()
      local json = tmp(".json")
      local r = bench({ "-t2", "-c4", "-d0.5s", "--json", json, "-s", SCRIPTS .. "lookup.lua", url(srv) }, 20,
        { BENCH_CLOSED_PORT = tostring(closed) })
      assert.equal(0, r.code, r.context)
      local k, d = r.kv, json_of(r, json)
      assert.is_true(tonumber(k.lookup_count) >= 1, r.context)
      assert.equal("127.0.0.1:" .. srv.port, k.lookup_first)
      assert.equal(k.lookup_count, k.reachable)
      assert.equal("127.0.0.1:" .. closed, k.closed)
      assert.equal("false", k.closed_connect)
      -- in the threads, wrk.thread.addr is the address setup() chose
      assert.equal("127.0.0.1:" .. srv.port, k["thread_addr." .. srv.port], r.context)
      assert.equal("127.0.0.1:" .. closed, k["thread_addr." .. closed], r.context)
      -- thread 1 loads the server, thread 2 cannot connect to its address
      assert.is_true(d.requests > 0, r.context)
      assert.is_true(d.errors.connect > 0, r.context)
    end, 20)
  end)

  it("unpack, loadstring and bit work as in wrk's LuaJIT (main and thread states)", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c1", "-d0.3s", "-s", SCRIPTS .. "compat.lua", url(srv) })
      assert.equal(0, r.code, r.context)
      assert.same({ unpack = "123", loadstring = "42", ["bit.band"] = "12", ["bit.bor"] = "7", ["bit.bxor"] = "6",
        ["bit.bnot"] = "-1", ["bit.lshift"] = "16", ["bit.rshift"] = "16", ["bit.arshift"] = "16", ["bit.tobit"] = "-1",
        ["bit.tohex"] = "000000ff" }, r.kv)
    end, 20)
  end)

  it("wrk.headers.Host is set before init(), as wrk's init sets it (-H Host: wins)", function()
    run(function()
      local hosts = {}
      local srv = serve(function(req, res) hosts[req.headers.host] = true res:send("ok") end)
      local _g <close> = guard(srv)
      local script = writefile(tmp(".lua"), [[
function request() return "GET / HTTP/1.1\r\nHost: " .. wrk.headers["Host"] .. "\r\n\r\n" end
]])
      local r = bench({ "-t1", "-c1", "-d0.3s", "-s", script, url(srv) })
      assert.equal(0, r.code, r.context)
      assert.same({ [url(srv):match("^http://([^/]+)")] = true }, hosts, r.context)
      hosts = {}
      r = bench({ "-t1", "-c1", "-d0.3s", "-H", "Host: example.test", "-s", script, url(srv) })
      assert.equal(0, r.code, r.context)
      assert.same({ ["example.test"] = true }, hosts, r.context)
    end, 20)
  end)

  it("wrk.thread:stop() in response() stops the thread's requests at once, as wrk's aeStop", function()
    run(function()
      local served = 0
      local srv = serve(function(_, res) served = served + 1 res:send("ok") end)
      local _g <close> = guard(srv)
      local script = writefile(tmp(".lua"), [[
local n = 0
function response() n = n + 1 if n >= 5 then wrk.thread:stop() end end
function done(summary) io.write("@requests=", summary.requests, "\n") end
]])
      local r = bench({ "-t1", "-c1", "-d1s", "-s", script, url(srv) })
      assert.equal(0, r.code, r.context)
      -- one connection, one request at a time: the fifth answer is the last request sent
      assert.equal("5", r.kv.requests, r.context)
      assert.equal(5, served, r.context)
    end, 20)
  end)
end)

---------------------------------------------------------------------------------------------
-- thresholds and exit status

describe("bench: thresholds and exit status", function()
  local function hello()
    return serve(function(_, res) res:send("hello") end)
  end

  it("all thresholds pass: exit 0, PASS lines", function()
    run(function()
      local srv = hello()
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c2", "-d0.4s", "--threshold", "p99<5s", "--threshold", "errors<1%",
        "--threshold", "rps>1", "--threshold", "mean<=2s", url(srv) })
      assert.equal(0, r.code, r.context)
      assert.matches("PASS p99<5s (actual ", r.out, 1, true)
      assert.matches("PASS errors<1%% %(actual 0%.000%%%)", r.out)
      assert.matches("PASS rps>1 (actual ", r.out, 1, true)
      assert.matches("PASS mean<=2s (actual ", r.out, 1, true)
    end, 20)
  end)

  it("a failing threshold: exit 1 with a FAIL line (the others still reported)", function()
    run(function()
      local srv = hello()
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c2", "-d0.4s", "--threshold", "p50<1us", "--threshold", "errors<10", url(srv) })
      assert.equal(1, r.code, r.context)
      assert.matches("FAIL p50<1us %(actual [%d.]+[mu]?s%)", r.out)
      assert.matches("PASS errors<10 (actual 0)", r.out, 1, true)
    end, 20)
  end)

  -- Regression: thresholds were read only after the run: a bad one ran the whole test and
  -- exited 1, and some raised there (a traceback, no outputs). Now exit 2 before the run.
  it("an unparsable threshold: exit 2 with a message naming it, before any run", function()
    run(function()
      for _, case in ipairs { { "p99 fast", "cannot parse threshold 'p99 fast'" },
                              { "p99<soon", "bad value in threshold 'p99<soon'" },
                              { "bogus<1", "unknown metric 'bogus' in threshold 'bogus<1'" },
                              { "p99.9.9<1s", "bad percentile in threshold 'p99.9.9<1s'" },
                              { "p.<1s", "bad percentile in threshold 'p.<1s'" },
                              { "p150<1s", "bad percentile in threshold 'p150<1s'" },
                              { "p99=5ms", "cannot parse threshold 'p99=5ms'" },
                              { "p99<1M", "bad value in threshold 'p99<1M'" } } do
        local json = tmp(".json")
        -- (port 1: a run would be connect errors; none starts)
        local r = bench({ "-t1", "-c1", "-d5s", "--json", json, "--threshold", case[1], "http://127.0.0.1:1/" })
        assert.equal(2, r.code, r.context)
        assert.matches(case[2], r.err, 1, true)
        assert.not_matches("traceback", r.err)
        assert.is_nil(readfile(json) ~= "" and readfile(json) or nil, "a run happened" .. r.context)
      end
    end, 60)
  end)

  -- Regression: an empty histogram read as 0, so a latency threshold passed when no request
  -- completed at all (a closed port: "PASS p99<50ms (actual 0.00us)", exit 0).
  it("a latency threshold with no request completed fails: no samples", function()
    run(function()
      local port = helper.free_port()
      local r = bench({ "-t1", "-c1", "-d0.3s", "--threshold", "p99<50ms", "--threshold", "mean<1s",
        ("http://127.0.0.1:%d/"):format(port) })
      assert.equal(1, r.code, r.context)
      assert.matches("FAIL p99<50ms (no samples", r.out, 1, true)
      assert.matches("FAIL mean<1s (no samples", r.out, 1, true)
    end, 20)
  end)

  it("usage errors exit 2 with a message, before any run", function()
    run(function()
      local r = bench({ "--no-such-option", "http://127.0.0.1:1/" })
      assert.equal(2, r.code, r.context)
      assert.matches("unknown option --no-such-option", r.err, 1, true)
      r = bench({ "-t4", "-c2", "http://127.0.0.1:1/" })
      assert.equal(2, r.code, r.context)
      assert.matches("connections must be >= threads", r.err, 1, true)
      r = bench({ "-d", "soon", "http://127.0.0.1:1/" })
      assert.equal(2, r.code, r.context)
      r = bench({ "-c2" })
      assert.equal(2, r.code, r.context)
      assert.matches("a URL is required", r.err, 1, true)
      r = bench({ "-R", "100", "--pipeline", "2", "http://127.0.0.1:1/" })
      assert.equal(2, r.code, r.context)
      -- a value that does not parse, or a count below 1 once whole: an error naming it
      for _, case in ipairs { { { "-R", "abc" }, "bad value for %-R: 'abc'" },
                              { { "--streams", "xyz" }, "bad value for %-%-streams: 'xyz'" },
                              { { "--agents", "two" }, "bad value for %-%-agents: 'two'" },
                              { { "-t", "0.5", "-c", "10" }, "bad value for threads" },
                              { { "--pipeline", "0.5" }, "bad value for pipeline" },
                              { { "--timeout", "never" }, "bad value for %-%-timeout: 'never'" } } do
        local args = case[1]
        args[#args + 1] = "http://127.0.0.1:1/"
        r = bench(args)
        assert.equal(2, r.code, r.context)
        assert.matches(case[2], r.err)
        assert.not_matches("traceback", r.err)
      end
    end, 20)
  end)
end)

---------------------------------------------------------------------------------------------
-- JSON

describe("bench: the JSON document", function()
  it("has every documented field with its type (docs/bench.md)", function()
    run(function()
      local r = delayed()
      local d = r.doc
      local problems = {}
      -- (`rate` without -R: the next test)
      local schema = { rate = "number|null|absent" }
      for k, v in pairs(SCHEMA) do schema[k] = schema[k] or v end
      conform(d, schema, "$", problems)
      assert(#problems == 0, table.concat(problems, "\n") .. "\n" .. r.json_text)
      assert.matches("^http://127%.0%.0%.1:%d+/$", d.url)
      assert.equal(2, d.threads)
      assert.equal(10, d.connections)
      assert.equal(1, d.pipeline)
      between(1.9, 2.3, d.duration_s, "duration_s")
      for code, n in pairs(d.statuses) do
        assert.matches("^%d%d%d$", code)
        assert.equal("integer", jkind(n))
      end
      local pct = {}
      for p in pairs(d.latency_us.percentiles) do pct[#pct + 1] = p end
      table.sort(pct, function(a, b) return tonumber(a) < tonumber(b) end)
      assert.same({ "50", "75", "90", "95", "99", "99.9", "99.99", "99.999" }, pct)
      local prev = 0
      for _, p in ipairs(pct) do
        assert.is_true(d.latency_us.percentiles[p] >= prev)
        prev = d.latency_us.percentiles[p]
      end
      assert.same({ "p50<1s", "errors<1%" }, { d.thresholds[1].expr, d.thresholds[2].expr })
      assert.is_true(d.thresholds[1].pass and d.thresholds[2].pass)
      assert.matches("^PASS p50<1s", d.thresholds[1].message)
    end, 30)
  end)

  it("keeps `rate` (null without -R) and empty lists as arrays: timeline [], thresholds []", function()
    run(function()
      local srv = serve(function(_, res) res:send("x") end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c1", "-d0.3s", "--json", "-", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      local problems = {}
      conform(d, SCHEMA, "$", problems)
      assert(#problems == 0, table.concat(problems, "\n") .. "\n" .. r.out)
    end, 20)
  end)

  it("sends the URL's query string (wrk.path is the path and the query)", function()
    run(function()
      local targets = {}
      local srv = serve(function(req, res)
        targets[req.target] = (targets[req.target] or 0) + 1
        res:send("x")
      end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c1", "-d0.2s", url(srv, "/search?q=moon&page=2") })
      assert.equal(0, r.code, r.context)
      local seen = {}
      for t in pairs(targets) do seen[#seen + 1] = t end
      assert.same({ "/search?q=moon&page=2" }, seen)
    end, 20)
  end)
end)

---------------------------------------------------------------------------------------------
-- HTML report in headless Chromium

local function png_size(data)
  if not data or data:sub(1, 8) ~= "\137PNG\r\n\26\n" or data:sub(13, 16) ~= "IHDR" then return nil end
  return string.unpack(">I4I4", data, 17)
end

describe("bench: the HTML report", function()
  it("is one self-contained page with the run's data", function()
    run(function()
      local r = delayed()
      local h = r.html
      assert.is_truthy(h and #h > 2000, "no report" .. r.context)
      assert.matches("^<!DOCTYPE html>", h)
      assert.matches("<title>moonwire bench: http://127%.0%.0%.1:%d+/</title>", h)
      -- nothing fetched: no scripts, stylesheets, images, fonts or frames from anywhere
      for _, pat in ipairs{ "<script", "<link", "<img", "<iframe", "@import", "url%(", "src=", "href=" } do
        assert.not_matches(pat, h)
      end
      assert.equal(3, select(2, h:gsub("<svg ", "")))   -- percentiles, latency and throughput over time
      for _, text in ipairs{ "threads <b>2</b>", "connections <b>10</b>", "duration <b>2s</b>", "max (closed model)",
        "Latency by percentile", "Latency over time", "Throughput over time", "99.999%", "p50&lt;1s", "PASS",
        "latency (ms)", "requests per second", "time since start (s)" } do
        assert.matches(text, h, 1, true)
      end
      assert.matches(("%d"):format(r.doc.requests):reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", ""), h, 1,
        true)
    end, 30)
  end)

  it("renders in headless Chromium without console errors; a non-trivial screenshot", function()
    local f = io.open(CHROMIUM)
    if f then f:close() end
    assert(f ~= nil,
      "Chromium is not installed (" .. CHROMIUM .. "): run scripts/install-peers")
    run(function()
      local r = delayed()
      local page = writefile(tmp(".html"), r.html)
      local shot = tmp(".png")
      local profile = tmpdir()
      local code, _, err = shell(("%s --headless --no-sandbox --disable-gpu --disable-quic --no-first-run " ..
        "--disable-background-networking --disable-component-update --disable-sync --user-data-dir=%s " ..
        "--enable-logging=stderr --v=0 --screenshot=%s --window-size=1200,2000 %s"):format(CHROMIUM, quote(profile),
        quote(shot), quote("file://" .. page)), 60)
      assert.equal(0, code, "chromium failed:\n" .. tostring(err))
      for line in err:gmatch("[^\n]+") do
        assert.is_falsy(line:find("Uncaught", 1, true) or line:find("CONSOLE", 1, true),
          "console output from the page: " .. line)
      end
      local data = readfile(shot)
      assert.is_truthy(data, "no screenshot at " .. shot .. "\n" .. err)
      local w, ht = png_size(data)
      assert.is_truthy(w, "not a PNG: " .. shot)
      assert.same({ 1200, 2000 }, { w, ht })
      assert.is_true(#data > 50000, "screenshot of only " .. #data .. " bytes (an empty page?)")
    end, 70)
  end)
end)

---------------------------------------------------------------------------------------------
-- constant rate, coordinated omission, pipelining

describe("bench: the open model (-R)", function()
  local constant = once(function()
    local srv = serve(function(_, res) res:send("fast") end)
    local _g <close> = guard(srv)
    local r = bench({ "-t2", "-c10", "-d3s", "-R", "2000", "--latency", "--json", "-", url(srv) })
    r.doc = json_of(r)
    return r
  end)

  it("-R 2000 -d 3s achieves the requested rate within ±10%", function()
    run(function()
      local r = constant()
      assert.equal(0, r.code, r.context)
      local d = r.doc
      between(1800, 2200, d.rps, "achieved rate" .. r.context)
      between(5400, 6600, d.requests, "requests")
      assert.equal(2000, d.rate)
      assert.matches("Requested rate: 2000/s, achieved [%d.]+/s", r.err)
      for i = 1, #d.timeline - 1 do between(1400, 2600, d.timeline[i].rps, "per-second rate") end
    end, 30)
  end)

  it("-R below one a second: the requested rate is said as given (0.50/s, not 0/s)", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      local r = bench({ "-t1", "-c1", "-d1s", "-R", "0.5", url(srv) })
      assert.equal(0, r.code, r.context)
      assert.matches("Requested rate: 0.50/s, achieved [%d.]+/s", r.out, 1, false)
      assert.equal(1, tonumber(r.out:match("(%d+) requests in")), r.context)
    end, 20)
  end)

  it("-R never reports a latency below the real round trip (min > 0 µs)", function()
    -- latency counts from the scheduled time; a request sent before it (a timer firing
    -- early) must not get a shorter latency than its round trip
    run(function()
      local r = constant()
      assert.is_true(r.doc.latency_us.min > 0, "min latency " .. r.doc.latency_us.min .. " µs" .. r.context)
    end, 30)
  end)

  it("a one-second stall shows in the percentiles with -R, and hides in the closed model", function()
    run(function()
      -- instant answers, except that requests arriving from 1 s after the first one wait
      -- until 2 s (one stall of a second)
      local first, stall_end
      local srv = serve(function(_, res)
        local now = mw.now()
        first = first or now
        if not stall_end and now - first >= 1 then stall_end = now + 1 end
        if stall_end and now < stall_end then mw.sleep(stall_end - now) end
        res:send("ok")
      end)
      local _g <close> = guard(srv)
      local open = bench({ "-t1", "-c10", "-d3s", "-R", "1000", "--latency", "--json", "-", url(srv) })
      assert.equal(0, open.code, open.context)
      local o = json_of(open)
      first, stall_end = nil, nil
      local closed = bench({ "-t1", "-c10", "-d3s", "--latency", "--json", "-", url(srv) })
      assert.equal(0, closed.code, closed.context)
      local c = json_of(closed)
      -- open model: the requests scheduled during the stall waited up to a second
      assert.is_true(o.latency_us.percentiles["99"] >= 300000, "open p99 " .. o.latency_us.percentiles["99"] ..
        " µs" .. open.context)
      assert.is_true(o.latency_us.percentiles["90"] >= 100000, "open p90 " .. o.latency_us.percentiles["90"])
      between(900000, 1500000, o.latency_us.max, "open max")
      between(2700, 3300, o.requests, "open requests")
      -- closed model: only the requests in flight during the stall saw it
      between(900000, 1500000, c.latency_us.max, "closed max" .. closed.context)
      assert.is_true(c.latency_us.percentiles["99"] < 100000, "closed p99 " .. c.latency_us.percentiles["99"])
      assert.is_true(o.latency_us.percentiles["99"] > 5 * c.latency_us.percentiles["99"])
    end, 40)
  end)
end)

describe("bench: pipelining", function()
  -- Regression: with -s, --pipeline was ignored (the fixed request of a script without a
  -- request() hook was built without :rep(pipeline)). The server here answers only once it
  -- holds 4 requests: unpipelined, every request would time out.
  it("--pipeline 4 with a script that only sets headers: 4 requests a write", function()
    run(function()
      local l, port = helper.listen()
      local problems = {}
      local acceptor = mw.spawn(function()
        while true do
          local s = l:accept()
          if not s then return end
          mw.spawn(function()
            while true do
              for _ = 1, 4 do
                local line = s:read("l", 5)
                if line and not line:match("^GET / HTTP/1%.1$") then problems[#problems + 1] = line end
                local saw = false
                while line and line ~= "" do
                  if line == "X-Test: yes" then saw = true end
                  line = s:read("l", 5)
                end
                if not line then s:close() return end
                if not saw then problems[#problems + 1] = "no X-Test header" end
              end
              if not s:write(("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"):rep(4)) then return end
            end
          end)
        end
      end)
      local _ <close> = setmetatable({}, { __close = function() acceptor:cancel() l:close() end })
      local script = writefile(tmp(".lua"), 'wrk.headers["X-Test"] = "yes"')
      local r = bench({ "-t1", "-c2", "-d0.5s", "--timeout", "0.3s", "--pipeline", "4", "-s", script, "--json", "-",
        ("http://127.0.0.1:%d/"):format(port) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.same({}, problems)
      assert.is_true(d.requests >= 8 and d.requests % 4 == 0, d.requests .. " requests" .. r.context)
      assert.equal(0, d.errors.timeout, r.context)
    end, 20)
  end)

  it("--pipeline with a script's request() hook: exit 2 (the hook pipelines by itself)", function()
    run(function()
      local r = bench({ "-t1", "-c1", "-d5s", "--pipeline", "2", "-s", SCRIPTS .. "pipeline.lua",
        "http://127.0.0.1:1/" })
      assert.equal(2, r.code, r.context)
      assert.matches("--pipeline does not go with a script's request()", r.err, 1, true)
    end, 20)
  end)

  it("--pipeline 4: every response counted (not one sample per batch, as wrk does)", function()
    run(function()
      local answered = 0
      local srv = serve(function(_, res)
        answered = answered + 1
        res:send("p")
      end)
      local _g <close> = guard(srv)
      local r = bench({ "-t2", "-c4", "-d1s", "--pipeline", "4", "--json", "-", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.equal(4, d.pipeline)
      assert.is_true(d.requests > 100, r.context)
      assert.equal(d.requests, d.statuses["200"])
      -- what the server answered, less at most one batch per connection cut off by the end
      assert.is_true(answered >= d.requests and answered <= d.requests + 4 * 4,
        ("server answered %d, client counted %d"):format(answered, d.requests))
    end, 20)
  end)
end)

---------------------------------------------------------------------------------------------
-- scenarios (--scenario): virtual users in one process

local function scenario_file(text)
  return writefile(tmp(".lua"), text)
end

describe("bench: scenarios", function()
  -- Regression: a user's iterations ran in a loop that never yielded, so a user without
  -- I/O (or one raising at once) kept the loop, the stage loop never ran to set the stop,
  -- and the run never ended. Now an iteration that gave the loop no turn is followed by a
  -- yield, and an error by a back-off.
  it("users that never yield, or raise at once, end with the run; user errors are reported", function()
    run(function()
      local busy = scenario_file([[
return { users = 2, duration = "0.5s", user = function() local x = 0 for i = 1, 100 do x = x + i end end }
]])
      local r = bench({ "-t1", "--scenario", busy }, 10)
      assert.equal(0, r.code, r.context)
      assert.matches("iterations%.*: %d+", r.out)
      local raising = scenario_file([[
return { users = 2, duration = "0.5s", user = function() local x = nil; return x.field end }
]])
      r = bench({ "-t2", "--scenario", raising, "--json", "-" }, 10)
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      -- backing off (10 ms doubling): a few iterations per user, not a spin
      assert.is_true(d.user_errors >= 2 and d.user_errors <= 40, d.user_errors .. " user errors" .. r.context)
      assert.equal(d.user_errors, d.metrics.iterations.value)
      assert.matches("user errors: %d+ %(first: [^\n]*attempt to index", r.err)
    end, 40)
  end)

  -- Regression (found by review): setup() returning a function failed with serial.lua's
  -- line ("cannot serialize a function"), which names neither setup() nor the fix
  it("setup() returning what cannot go to the threads: one line that names setup()", function()
    run(function()
      local sc = scenario_file([[
return { users = 1, duration = "0.2s", setup = function() return { f = print } end, user = function() end }
]])
      local r = bench({ "-t1", "--scenario", sc }, 10)
      assert.equal(2, r.code, r.context)
      assert.matches("moonwire bench: scenario setup() returned what cannot go to the threads "
        .. "(cannot serialize a function)", r.err, 1, true)
      assert.is_nil(r.err:find("serial.lua", 1, true), r.context)
    end, 20)
  end)

  -- Regression: a scenario run had no SIGINT handler and no stop cell: Ctrl-C went
  -- unheeded and the report was lost. Now it stops as in plain mode and reports what ran.
  it("Ctrl-C ends the run early with the report and the JSON of what ran", function()
    run(function()
      local sc = scenario_file([[
local bench = require "moonwire.bench"
return { users = 2, duration = "20s", user = function() bench.counter("ticks"):add(1) bench.sleep(0.05) end }
]])
      local json = tmp(".json")
      local words = { "env", "LUA_PATH=" .. quote(package.path), "LUA_CPATH=" .. quote(package.cpath) }
      local preload = os.getenv("MW_ASAN_PRELOAD")
      if preload then words[#words + 1] = "LD_PRELOAD=" .. quote(preload) end
      local t0 = mw.now()
      local code, out, err = shell(("%s timeout --preserve-status -s INT 1 lua5.4 %s bench --quiet -t2 "
        .. "--scenario %s --json %s"):format(table.concat(words, " "), quote(ROOT .. "/bin/moonwire"), quote(sc),
        quote(json)), 25)
      local took = mw.now() - t0
      assert.is_true(took < 8, ("a 20 s scenario went on %.1f s after Ctrl-C"):format(took))
      assert.equal(0, code, tostring(err))
      assert.matches("ticks", out)
      assert.matches("interrupted", err)
      local d = json_of({ context = err }, json)
      assert.is_true(d.metrics.ticks.value > 0)
      assert.is_true(d.duration_s < 5, "duration " .. tostring(d.duration_s))
    end, 30)
  end)

  -- Regression: the summary printed counters with %d, so one that added a fraction raised
  -- in the report ("number has no integer representation"), exit 2 and no report.
  it("a counter that adds fractions is reported as a number", function()
    run(function()
      local sc = scenario_file([[
local bench = require "moonwire.bench"
local done = false
return { users = 1, duration = "0.3s", user = function()
  if not done then bench.counter("n"):add(0.1) bench.counter("n"):add(0.15) done = true end
  bench.sleep(0.05)
end }
]])
      local r = bench({ "-t1", "--scenario", sc }, 10)
      assert.equal(0, r.code, r.context)
      assert.matches("  n%.+: 0%.25  [%d.]+/s\n", r.out)
    end, 20)
  end)

  -- Regression: a scenario's thresholds (and --threshold with --scenario) were read after
  -- the run; an unknown statistic ('iterations.bogus>1') was ignored and passed.
  it("a threshold that cannot be judged: exit 2 before the run (scenario file or command line)", function()
    run(function()
      local sc = scenario_file([[
return { users = 1, duration = "5s", thresholds = { "iterations.bogus>1" }, user = function() end }
]])
      local r = bench({ "-t1", "--scenario", sc }, 10)
      assert.equal(2, r.code, r.context)
      assert.matches("a counter has no statistic 'bogus'", r.err, 1, true)
      assert.not_matches("Running", r.out)
      sc = scenario_file([[
return { users = 1, duration = "5s", user = function() end }
]])
      r = bench({ "-t1", "--scenario", sc, "--threshold", "http_req_duration.p150<1s" }, 10)
      assert.equal(2, r.code, r.context)
      assert.matches("bad percentile in threshold 'http_req_duration.p150<1s'", r.err, 1, true)
    end, 20)
  end)

  -- Regression: a scenario's HTML showed -d's default (10s) for its duration, 0 requests,
  -- 0 req/s, empty errors and status tables, no checks and no user errors; its JSON had
  -- "thresholds":{} (an object), no first_error, and was invalid with a name that is not UTF-8.
  it("the JSON and HTML: requests, checks, user errors, thresholds as a list, valid UTF-8", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      local sc = scenario_file(([[
local bench = require "moonwire.bench"
return { users = 2, duration = "0.5s", user = function(vu)
  local res = bench.http.get("%s")
  bench.check("status is 200", res and res.status == 200)
  bench.check("badÿname", true)
  if vu.iteration == 0 then error("first iteration fails") end
  bench.sleep(0.02)
end }
]]):format(url(srv)))
      local json, html = tmp(".json"), tmp(".html")
      local r = bench({ "-t1", "--scenario", sc, "--json", json, "--html", html }, 20)
      assert.equal(0, r.code, r.context)
      local text = readfile(json)
      assert.is_truthy(utf8.len(text), "the JSON is not UTF-8" .. r.context)
      local d = json_of(r, json)
      assert.equal("array", jkind(d.thresholds))
      assert.matches("first iteration fails", d.first_error)
      assert.equal(2, d.user_errors)
      local n = d.metrics.http_reqs.value
      assert.is_true(n > 4, r.context)
      local h = readfile(html)
      assert.matches("duration <b>500ms</b>", h, 1, true)
      assert.not_matches("duration <b>10s</b>", h, 1, true)
      assert.matches(("requests</div><div class=\"value\">%d</div>"):format(n), h, 1, true)
      assert.matches("status is 200", h, 1, true)
      assert.matches("user errors</div><div class=\"value\">2</div>", h, 1, true)
      assert.matches("first iteration fails", h, 1, true)
      assert.not_matches("No responses.", h, 1, true)    -- no empty status table
    end, 30)
  end)

  -- Regression: the run's duration (and so every rate) included the up-to-10 s grace given
  -- to the iterations running at the end; "Running scenario" said 0s for 0.5 s.
  it("the duration is the stages', not the grace after them; the header says 500.00ms", function()
    run(function()
      local sc = scenario_file([[
local bench = require "moonwire.bench"
return { users = 1, duration = "0.5s", user = function() bench.sleep(1.2) end }
]])
      local r = bench({ "-t1", "--scenario", sc, "--json", "-" }, 10)
      assert.equal(0, r.code, r.context)
      assert.matches("Running scenario [^\n]*: 1 threads, 500.00ms", r.err)
      local d = json_of(r)
      assert.is_true(d.duration_s >= 0.5 and d.duration_s < 0.9, "duration " .. d.duration_s .. r.context)
      assert.equal(1, d.metrics.iterations.value, r.context)          -- the iteration of the grace counts
    end, 20)
  end)

  it("stages end on time, not at the next tenth of a second (3 x 250 ms is 750 ms, not 900)", function()
    run(function()
      local sc = scenario_file([[
local bench = require "moonwire.bench"
return { stages = { { duration = "250ms", target = 2 }, { duration = "250ms", target = 2 },
  { duration = "250ms", target = 0 } }, user = function() bench.sleep(0.01) end }
]])
      local r = bench({ "-t1", "--scenario", sc, "--json", "-" }, 10)
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.is_true(d.duration_s >= 0.75 and d.duration_s < 0.8, "duration " .. d.duration_s .. r.context)
    end, 20)
  end)

  it("a threshold on a trend with no value recorded fails: no samples", function()
    run(function()
      local sc = scenario_file([[
local bench = require "moonwire.bench"
return { users = 1, duration = "0.3s", thresholds = { "never.p99<50ms" },
  user = function() bench.trend("never") bench.sleep(0.05) end }
]])
      local r = bench({ "-t1", "--scenario", sc }, 10)
      assert.equal(1, r.code, r.context)
      assert.matches("FAIL never.p99<50ms (no samples)", r.out, 1, true)
    end, 20)
  end)
end)

---------------------------------------------------------------------------------------------
-- regressions (found by review)

describe("bench: regressions", function()
  -- Regression: the requests answered during the end-of-run drain were counted as requests
  -- of the run (st.count grew after st.t_end was taken): a server answering every request
  -- after 1.5 s, -c50 -d1s, reported "50 requests in 1.00s, Requests/sec 49.99" while the
  -- timeline showed 0 and nothing completed within the run (wrk reports 0). An answer after
  -- the end is now neither counted nor handed to response().
  it("answers that arrive after -d ends are not requests of the run (count, bytes, rate, latency)", function()
    run(function()
      local srv = serve(function(_, res)
        hold(0.6)
        res:send("late")
      end)
      local _g <close> = guard(srv)
      for _, extra in ipairs({ {}, { "-s", SCRIPTS .. "response.lua" } }) do
        local jpath = tmp(".json")
        local args = { "-t1", "-c5", "-d0.3s", "--timeout", "2s", "--json", jpath }
        for _, a in ipairs(extra) do args[#args + 1] = a end
        args[#args + 1] = url(srv)
        local r = bench(args)
        assert.equal(0, r.code, r.context)
        local d = json_of(r, jpath)
        assert.equal(0, d.requests, r.context)
        assert.equal(0, d.bytes, r.context)
        assert.equal(0, d.rps, r.context)
        assert.equal(0, d.latency_us.max, r.context)
        assert.same({}, setmetatable(d.statuses, nil), r.context)
        assert.equal(0, d.hung, r.context)   -- (answered, within the drain: not hung either)
        if extra[1] then assert.equal("0", r.kv.sum, r.context) end   -- response() not called
      end
    end, 30)
  end)

  -- Regression: -R gave every thread the same send schedule (each connection offset by its
  -- index within its thread only), so the threads' requests went out at the same instants,
  -- and a connection also sent at the deadline's edge: -R 2 -t2 -c4 -d3s sent pairs every
  -- second and achieved 2.67/s. The connections of all threads now interleave, and nothing
  -- due at or after the end is sent.
  it("-R: the threads' schedules interleave evenly; nothing is sent at the deadline's edge", function()
    run(function()
      local arrivals = {}
      local srv = serve(function(_, res)
        arrivals[#arrivals + 1] = core.hrtime()
        res:send("ok")
      end)
      local _g <close> = guard(srv)
      local r = bench({ "-t2", "-c2", "-d2s", "-R", "2", "--json", "-", url(srv) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      -- due at 0, 0.5, 1 and 1.5 s (the next, at 2 s, is the end)
      assert.equal(4, #arrivals, r.context)
      assert.equal(4, d.requests, r.context)
      table.sort(arrivals)
      for i = 2, #arrivals do
        local gap = (arrivals[i] - arrivals[i - 1]) / 1e9
        assert.is_true(gap > 0.3 and gap < 0.7, ("gap %.3f s between requests %d and %d"):format(gap, i - 1, i)
          .. r.context)
      end
    end, 30)
  end)

  -- Regression: with --pipeline, a server that ends the connection on purpose in the middle
  -- of a batch (Connection: close, as nginx after keepalive_requests) got the rest of the
  -- batch read from the closed connection: a read error per batch. The batch now ends there,
  -- without an error; its unanswered requests are dropped (not counted) and the next
  -- connection writes a new batch.
  it("--pipeline: a Connection: close in the middle of a batch is no read error", function()
    run(function()
      local answered, heads = 0, {}
      -- the batch of 4, then 2 answers, the second ending the connection
      local port, _ <close> = raw_server(function(s)
        heads[s] = (heads[s] or 0) + 1
        if heads[s] < 4 then return true end
        s:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" ..
          "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        answered = answered + 2
        s:close()
        return false
      end)
      local r = bench({ "-t1", "-c2", "-d0.5s", "--pipeline", "4", "--json", "-",
        ("http://127.0.0.1:%d/"):format(port) })
      assert.equal(0, r.code, r.context)
      local d = json_of(r)
      assert.same({ connect = 0, read = 0, write = 0, status = 0, timeout = 0 }, setmetatable(d.errors, nil), r.context)
      assert.is_true(d.requests >= 10 and d.requests % 2 == 0, d.requests .. " requests" .. r.context)
      assert.is_true(d.requests <= answered, ("%d counted, %d answered"):format(d.requests, answered) .. r.context)
      assert.equal(0, d.hung, r.context)
    end, 20)
  end)

  -- Regression: -t 1366 died with a Lua stack trace ("bad argument #1 to 'counters' (1..4096
  -- cells)": 3 cells a thread and the stop flag); `-m 2.5 --h2` was taken as the method
  -- "2.5"; a missing -s file and a hook that raised printed stack traces. Each is now one
  -- line and exit 2.
  it("too many threads, -m 2.5, a missing script, a hook that raises: one line, exit 2", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _g <close> = guard(srv)
      local hook = writefile(tmp(".lua"), "function response() error('boom in response') end")
      for _, case in ipairs {
        { { "-t", "1366", "-c", "1366" }, "too many threads: 1366 %(at most 1365%)" },
        { { "-m", "2.5", "--h2" }, "bad value for %-m: '2%.5'" },
        { { "-s", "/nonexistent/script.lua" }, "cannot load script: cannot open /nonexistent/script.lua" },
        { { "-t1", "-c1", "-d2s", "-s", hook }, "thread 1 failed: [^\n]*boom in response\n$" } } do
        local args = case[1]
        args[#args + 1] = url(srv)
        local r = bench(args)
        assert.equal(2, r.code, r.context)
        assert.matches(case[2], r.err)
        assert.not_matches("traceback", r.err)
      end
    end, 20)
  end)
end)
