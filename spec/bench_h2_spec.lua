-- `moonwire bench --h2` (docs/bench.md): HTTP/2 by prior knowledge against our server (its
-- MAX_CONCURRENT_STREAMS respected, counts checked against the server's own), against
-- nghttpd over TLS by ALPN, the same order of magnitude as h2load on the same server, a
-- wrk script (request() and response() hooks) run unchanged over HTTP/2, constant rate, and
-- the JSON document's h2 fields. The CLI runs in the background and is polled from the loop
-- so the servers keep serving; runs are short and every wait is bounded.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"
local procs = require "spec.peers.procs"

local SCRIPTS = procs.root .. "/spec/wrk_scripts/"

local function bench(args, limit)
  limit = limit or 20
  local words = {}
  for i, a in ipairs(args) do words[i] = procs.quote(a) end
  local cmd = ("%s timeout -k 1 %d lua5.4 %s bench --quiet %s"):format(procs.lua_env(), limit,
    procs.quote(procs.root .. "/bin/moonwire"), table.concat(words, " "))
  local code, out, err = procs.shell(cmd, limit + 5)
  return { code = code, out = out, err = err,
    context = ("\n$ moonwire bench %s\nexit %s\n--- stdout:\n%s\n--- stderr:\n%s"):format(table.concat(words, " "),
      tostring(code), out, err) }
end

local function serve(handler, opts)
  opts = opts or {}
  opts.host, opts.port, opts.handler = "127.0.0.1", 0, handler
  opts.error_log = function() end
  return assert(http.server(opts))
end

-- our JSON documents (no brackets inside strings) as Lua tables
-- spec/peers/h2_fake_server.py in `mode`: the process (to close) and its URL
local function fake(mode)
  local p = procs.start("h2_fake_server", procs.PYTHON .. " " .. procs.peers .. "/h2_fake_server.py " .. mode, 30)
  local ev = p:wait_event(function(e) return e.event == "listening" end)
  return p, "http://127.0.0.1:" .. ev.port .. "/"
end

-- the events `name` of a fake server so far, by connection number: { [conn] = n }, total
local function events(p, name)
  local by, n = {}, 0
  for _, e in ipairs(p:events()) do
    if e.event == name then
      by[tonumber(e.conn)] = (by[tonumber(e.conn)] or 0) + 1
      n = n + 1
    end
  end
  return by, n
end

local function decode(s)
  local src = s:match("%b{}")
  assert(src, "no JSON document in: " .. tostring(s))
  src = src:gsub("%[", "{"):gsub("%]", "}"):gsub('"([^"]-)"%s*:', '["%1"]='):gsub("null", "nil")
  return assert(load("return " .. src, "json", "t", {}))()
end

-- a wrk script in a temporary file (removed by the caller)
local function script(src)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(src)
  f:close()
  return path
end

describe("moonwire bench --h2", function()
  it("prior knowledge on http://: -c x -m streams, counts match the server's, MAX_CONCURRENT_STREAMS kept", function()
    run(function()
      local served, now, peak, ports = 0, 0, 0, {}
      local srv = serve(function(req, res)
        assert(req.version == "2")
        ports[req.remote_port] = true
        now = now + 1
        if now > peak then peak = now end
        mw.sleep(0.001)
        now = now - 1
        served = served + 1
        res:send("hello")
      end, { http2 = { max_streams = 8 } })
      local r = bench({ "--h2", "-t1", "-c2", "-m", "20", "-d1s", "--latency", "--json", "-",
        "http://127.0.0.1:" .. srv.port .. "/" }, 20)
      srv:close(0)
      assert.equal(0, r.code, r.context)
      local doc = assert(decode(r.out), r.context)
      assert.is_true(doc.requests > 100, r.context)
      -- every request the server answered was counted, but for those in flight at the end
      -- (at most 2 x 8), answered in the drain: not requests of the run, as in wrk
      assert.is_true(served >= doc.requests and served <= doc.requests + 16,
        ("served %d, counted %d"):format(served, doc.requests) .. r.context)
      assert.equal(doc.requests, doc.statuses["200"], r.context)
      assert.equal(0, doc.hung)
      assert.is_true(peak <= 16, "peak " .. peak)    -- 2 connections x 8 (the server's limit)
      local n = 0
      for _ in pairs(ports) do n = n + 1 end
      assert.equal(2, n)
      assert.equal(20, doc.h2.streams)
      assert.equal(0, doc.h2.reconnects)
      assert.is_table(doc.h2.rst)
      assert.is_table(doc.h2.goaway)
      assert.is_number(doc.h2.refused_retries)
      assert.is_true(doc.h2.ttfb_us.percentiles["99"] > 0)
      assert.is_true(doc.h2.ttfb_us.mean <= doc.latency_us.mean + 1)
      assert.matches("RST_STREAM received: none", r.err, 1, true)
      assert.matches("Time to first byte", r.err, 1, true)
    end, 40)
  end)

  it("the same order of magnitude as h2load against the same server", function()
    run(function()
      local srv = serve(function(_, res) res:send("hello") end)
      local url = "http://127.0.0.1:" .. srv.port .. "/"
      local r = bench({ "--h2", "-t1", "-c2", "-m", "10", "-d1s", "--json", "-", url }, 20)
      local code, out = procs.shell("h2load -c 2 -m 10 -D 1 " .. url, 20)
      srv:close(0)
      assert.equal(0, r.code, r.context)
      assert.equal(0, code, out)
      local ours = decode(r.out).rps
      local theirs = tonumber(out:match("finished in [%d.]+s, ([%d.]+) req/s"))
      assert.is_number(theirs, out)
      assert.is_true(ours > theirs / 10 and ours < theirs * 10, ("ours %.0f, h2load %.0f"):format(ours, theirs))
    end, 40)
  end)

  it("a wrk script with request() and response() hooks runs unchanged over HTTP/2", function()
    run(function()
      local srv = serve(function(req, res)
        res:header("X-Token", req.headers["x-token"] or "none")
        res:send("body:" .. req.method)
      end)
      local r = bench({ "--h2", "-t2", "-c2", "-m", "4", "-d1s", "-s", SCRIPTS .. "response.lua",
        "http://127.0.0.1:" .. srv.port .. "/" }, 20)
      srv:close(0)
      assert.equal(0, r.code, r.context)
      local sum = tonumber(r.out:match("@sum=(%d+)"))
      local requests = tonumber(r.out:match("@requests=(%d+)"))
      assert.is_true(sum and sum > 0, r.context)
      assert.equal(requests, sum, r.context)
      assert.matches("@1.status=200", r.out, 1, true)
      assert.matches("@1.body=body:GET", r.out, 1, true)
    end, 40)
  end)

  it("constant rate (-R) over HTTP/2: the achieved rate is near the requested one", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local r = bench({ "--h2", "-t1", "-c2", "-m", "4", "-d2s", "-R", "500", "--json", "-",
        "http://127.0.0.1:" .. srv.port .. "/" }, 20)
      srv:close(0)
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.is_true(doc.rps > 400 and doc.rps < 600, r.context)
    end, 40)
  end)

  it("against nghttpd over TLS (ALPN h2)", function()
    run(function()
      local D = os.tmpname()
      os.remove(D)
      assert(os.execute(("%s/spec/fixtures/make-certs %s >/dev/null 2>&1"):format(procs.root, D)))
      os.execute("mkdir -p " .. D .. "/www && printf hello > " .. D .. "/www/index.html")
      local port = helper.free_port()
      local p = procs.start("nghttpd",
        ("/usr/sbin/nghttpd --address=127.0.0.1 -d %s/www %d %s/server.key %s/server-chain.pem")
          :format(D, port, D, D), 30)
      assert(procs.wait_for(function()
        local s = mw.tcp.connect("127.0.0.1", port, { timeout = 1 })
        if s then s:close() return true end
      end, 10))
      local r = bench({ "--h2", "-t1", "-c2", "-m", "8", "-d1s", "--json", "-",
        "https://127.0.0.1:" .. port .. "/index.html" }, 20)
      p:stop()
      os.execute("rm -rf " .. D)
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.is_true(doc.requests > 100, r.context)
      assert.equal(doc.requests, doc.statuses["200"], r.context)
      -- the frames received: HEADERS (9 + its block) and DATA (9 + "hello") at least
      assert.is_true(doc.bytes >= 24 * doc.requests and doc.bytes < 200 * doc.requests, r.context)
    end, 40)
  end)

  it("-m N needs --h2; --h2 and --pipeline do not go together", function()
    run(function()
      local r = bench({ "-m", "10", "http://127.0.0.1:1/" }, 10)
      assert.equal(2, r.code, r.context)
      assert.matches("needs --h2", r.err, 1, true)
      r = bench({ "--h2", "--pipeline", "4", "http://127.0.0.1:1/" }, 10)
      assert.equal(2, r.code, r.context)
    end)
  end)

  -- Regression: over --h2 the hooks were called bare in the stream tasks, so a response()
  -- or request() that raised (or a request() returning no string) killed only that task:
  -- exit 0, no requests, a new connection after another (found by review). They now go
  -- through the HTTP/1.1 engine's call_hook: the thread fails, as over HTTP/1.1.
  it("a hook that raises, or a request() that returns no string, fails the run as over HTTP/1.1", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local url = "http://127.0.0.1:" .. srv.port .. "/"
      local cases = {
        { 'response = function() error("boom in response") end', "boom in response" },
        { 'request = function() error("boom in request") end', "boom in request" },
        { "request = function() return nil end", "request() returned a nil" },
        { 'request = function() return "garbage" end', "request(): request without an end of head" },
        { 'delay = function() error("boom in delay") end', "boom in delay" },
      }
      for _, c in ipairs(cases) do
        local path = script(c[1])
        local r = bench({ "--h2", "-t1", "-c1", "-m2", "-d1s", "-s", path, url }, 20)
        os.remove(path)
        assert.equal(2, r.code, r.context)
        assert.matches("thread 1 failed:", r.err, 1, true)
        assert.matches(c[2], r.err, 1, true)
      end
      srv:close(0)
    end, 60)
  end)

  -- Regression: the hooks path had no schedule, so -R was ignored whenever a script had
  -- hooks (-R 50 made ~15000 requests in 2 s) and latency counted from when a request went
  -- out, hiding a stalling server (found by review). Its streams now keep the C driver's
  -- schedule: one request per stream per interval, latency and TTFB from when it was due.
  it("-R with hooks: the requested rate, latency counted from when each request was due", function()
    run(function()
      local slow = false
      local srv = serve(function(_, res)
        if slow then mw.sleep(0.2) end
        res:send("ok")
      end)
      local url = "http://127.0.0.1:" .. srv.port .. "/"
      local path = script('request = function() return wrk.format("GET", "/") end')
      local r = bench({ "--h2", "-t1", "-c2", "-m2", "-d2s", "-R", "50", "--json", "-", "-s", path, url }, 20)
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.is_true(doc.rps > 40 and doc.rps < 60, r.context)
      -- one stream, one request per 20 ms, each answered in 200 ms: the n-th is answered
      -- 200 + 180 n ms after it was due (the time since it was sent stays 200 ms)
      slow = true
      r = bench({ "--h2", "-t1", "-c1", "-m1", "-d1s", "-R", "50", "--json", "-", "-s", path, url }, 20)
      os.remove(path)
      srv:close(0)
      assert.equal(0, r.code, r.context)
      doc = decode(r.out)
      assert.is_true(doc.requests >= 3, r.context)
      assert.is_true(doc.latency_us.mean > 350000, r.context)
      assert.is_true(doc.h2.ttfb_us.mean > 350000, r.context)
    end, 60)
  end)

  -- Regression: over HTTP/1.1 response() finds a header by any case of its name (wrk hands
  -- the names as sent); over --h2 h["Content-Length"] was nil (found by review).
  it("response() finds headers by any case of their name, as over HTTP/1.1", function()
    run(function()
      local srv = serve(function(_, res)
        res:header("X-Token", "t")
        res:send("ok")
      end)
      local path = script([[
        response = function(status, h)
          if h["X-Token"] ~= "t" or h["x-token"] ~= "t" or h["Content-Length"] ~= "2" then
            error("headers: X-Token " .. tostring(h["X-Token"]) .. ", Content-Length " .. tostring(h["Content-Length"]))
          end
        end]])
      local r = bench({ "--h2", "-t1", "-c1", "-m2", "-d1s", "--json", "-", "-s", path,
        "http://127.0.0.1:" .. srv.port .. "/" }, 20)
      os.remove(path)
      srv:close(0)
      assert.equal(0, r.code, r.context)
      assert.is_true(decode(r.out).requests > 0, r.context)
    end, 40)
  end)

  -- Regression: an agent's --source (cfg.source, the load's local address) was ignored over
  -- --h2: its connect() did not pass it on, as engine.lua's does (found by review). Run
  -- through engine.run in a child, as an agent's thread does, on both HTTP/2 paths.
  it("an agent's source address (cfg.source) binds the HTTP/2 connections, with and without hooks", function()
    run(function()
      local from = {}
      local srv = serve(function(req, res)
        from[req.remote_addr] = (from[req.remote_addr] or 0) + 1
        res:send("ok")
      end)
      local child = script(([[
        local engine = require "moonwire.bench.engine"
        local port = %d
        local cfg = { thread_id = 1, threads = 1, h2 = true, streams = 1, conns_in_thread = 1,
          duration = 0.3, timeout = 1, source = "127.0.0.2", headers = {},
          target = { scheme = "http", host = "127.0.0.1", port = port, authority = "127.0.0.1:" .. port, target = "/" },
          addr = { host = "127.0.0.1", port = port } }
        local raw = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        local a = engine.run(cfg, { fixed_request = raw, fixed_depth = 1 })
        local b = engine.run(cfg, { request = function() return raw end })
        io.write(a.count, " ", b.count, "\n")
      ]]):format(srv.port))
      local cmd = ("%s timeout -k 1 20 lua5.4 %s"):format(procs.lua_env(), procs.quote(child))
      local code, out, err = procs.shell(cmd, 25)
      os.remove(child)
      srv:close(0)
      assert.equal(0, code, err)
      local a, b = out:match("^(%d+) (%d+)")
      assert.is_true(tonumber(a) > 0 and tonumber(b) > 0, out .. err)
      -- (the server answered those in flight at each run's end too: not counted)
      local n = 0
      for k, v in pairs(from) do
        assert.equal("127.0.0.2", k)
        n = n + v
      end
      assert.is_true(n >= a + b and n <= a + b + 2, ("server %d, counted %d"):format(n, a + b))
    end, 40)
  end)

  -- Regression: with hooks, a request refused by the server (REFUSED_STREAM, or above a
  -- GOAWAY's last stream id) was dropped uncounted, one that met a connection going away
  -- ("goaway") was counted a read error though never sent, and no RST_STREAM or GOAWAY frame
  -- was counted (found by review). It is now sent again once, due when it was, on the same
  -- connection or the next (counted as a REFUSED_STREAM retry); conn:attach counts the frames.
  it("with hooks a refused request is sent again once, and RST_STREAM and GOAWAY frames count", function()
    run(function()
      local path = script('request = function() return wrk.format("GET", "/") end')
      -- the first request of the first connection is reset with REFUSED_STREAM
      local p, url = fake("refuse")
      local r = bench({ "--h2", "-t1", "-c1", "-m1", "-d1s", "-R", "20", "--json", "-", "-s", path, url }, 20)
      local seen = 0                   -- (every request the server saw, the refused one too)
      for _, e in ipairs(p:events()) do
        if e.event == "request" then seen = seen + 1 end
      end
      p:stop()
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.equal(1, doc.h2.rst.REFUSED_STREAM, r.context)
      assert.equal(1, doc.h2.refused_retries, r.context)
      assert.equal(0, doc.errors.read, r.context)
      assert.equal(seen - 1, doc.requests, r.context)
      assert.equal(0, doc.hung, r.context)
      -- the first connection answers stream 1, then GOAWAY (last stream 1) once three more
      -- requests came: those, and any that met the connection going away, go on the next
      p, url = fake("goaway")
      r = bench({ "--h2", "-t1", "-c1", "-m4", "-d1s", "-R", "40", "--json", "-", "-s", path, url }, 20)
      p:stop()
      os.remove(path)
      assert.equal(0, r.code, r.context)
      doc = decode(r.out)
      assert.equal(1, doc.h2.goaway.NO_ERROR, r.context)
      assert.equal(1, doc.h2.reconnects, r.context)
      assert.is_true(doc.h2.refused_retries >= 3, r.context)
      assert.same({ connect = 0, read = 0, write = 0, status = 0, timeout = 0 }, doc.errors, r.context)
      assert.equal(0, doc.hung, r.context)
      assert.is_true(doc.requests >= 30, r.context)
    end, 60)
  end)

  -- Regression: the C driver counted a request refused by a connection going away (above
  -- its GOAWAY's last stream id) as a REFUSED_STREAM retry but dropped it: never sent again
  -- (goaway_after 5, -R 400: 800 sent, 667 answered and counted, 133 "retries" lost), and a
  -- server that sent GOAWAY at once got ~2000 connections a second with nothing counted
  -- (found by review). Such a request now goes first on the thread's next connection, due
  -- when it was; a connection that ends by GOAWAY with nothing answered is an error and
  -- is followed by a pause.
  it("the C driver sends a request refused by a GOAWAY again on the next connection", function()
    run(function()
      -- the first connection answers stream 1, then GOAWAY (last stream 1) once three more
      -- requests came
      local p, url = fake("goaway")
      local r = bench({ "--h2", "-t1", "-c1", "-m4", "-d1s", "-R", "20", "--json", "-", url }, 20)
      local seen = events(p, "request")
      p:stop()
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.equal(1, doc.h2.goaway.NO_ERROR, r.context)
      assert.equal(1, doc.h2.reconnects, r.context)
      assert.is_true(doc.h2.refused_retries >= 3, r.context)
      assert.same({ connect = 0, read = 0, write = 0, status = 0, timeout = 0 }, doc.errors, r.context)
      assert.equal(0, doc.hung, r.context)
      -- the 20 requests due in the second: each answered once (stream 1 on the first
      -- connection, the others on the second), none lost
      assert.is_true(doc.requests >= 19, r.context)
      assert.equal(doc.requests, 1 + seen[2], r.context)
    end, 40)
  end)

  it("a server that sends GOAWAY at once: errors and a pause between connections, on both paths", function()
    run(function()
      local path = script('request = function() return wrk.format("GET", "/") end')
      for _, hooks in ipairs({ false, true }) do
        local p, url = fake("goaway_at_once")
        local args = { "--h2", "-t1", "-c1", "-m2", "-d1s", "--json", "-", url }
        if hooks then table.insert(args, 1, "-s") table.insert(args, 2, path) end
        local r = bench(args, 20)
        local _, conns = events(p, "goaway")
        p:stop()
        assert.equal(0, r.code, r.context)
        local doc = decode(r.out)
        assert.equal(0, doc.requests, r.context)
        assert.is_true(conns >= 2 and conns <= 40, conns .. " connections" .. r.context)
        assert.equal(conns, doc.h2.goaway.NO_ERROR, r.context)
        if not hooks then assert.is_true(doc.errors.connect >= conns - 1, r.context) end
      end
      os.remove(path)
    end, 40)
  end)

  -- A request of the hooks path that timed out kept its stream open: against a server that
  -- takes one stream at a time, every later request waited for that slot and timed out too.
  -- It is now reset.
  it("with hooks, a request that timed out is reset and frees its stream slot", function()
    run(function()
      local path = script('request = function() return wrk.format("GET", "/") end')
      local p, url = fake("hang_first")    -- MAX_CONCURRENT_STREAMS 1; stream 1 never answered
      local r = bench({ "--h2", "-t1", "-c1", "-m1", "-d1.5s", "--timeout", "0.3s", "--json", "-", "-s", path, url },
        20)
      local _, resets = events(p, "reset")
      p:stop()
      os.remove(path)
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.equal(1, doc.errors.timeout, r.context)
      assert.equal(1, resets, r.context)
      assert.is_true(doc.requests > 10, r.context)
    end, 40)
  end)

  -- Regression: with hooks, the requests still unanswered when the run ended were reported
  -- nowhere and waited the whole --timeout, not the drain (at most 2 s): against a silent
  -- server -d1s --timeout 6s took 6.7 s (found by review). Each request's wait now ends at
  -- the drain's end at the latest, and what is unanswered then is hung, as over HTTP/1.1.
  it("with hooks, requests unanswered at the end are hung and wait at most the drain", function()
    run(function()
      local path = script('request = function() return wrk.format("GET", "/") end')
      local p, url = fake("silent")
      local t0 = mw.now()
      local r = bench({ "--h2", "-t1", "-c1", "-m2", "-d1s", "--timeout", "6s", "--json", "-", "-s", path, url }, 20)
      local took = mw.now() - t0
      local _, seen = events(p, "request")
      p:stop()
      os.remove(path)
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.equal(2, seen, r.context)
      assert.equal(0, doc.requests, r.context)
      assert.equal(2, doc.hung, r.context)
      assert.equal(0, doc.errors.timeout, r.context)
      assert.is_true(took < 5, ("took %.1f s"):format(took) .. r.context)   -- 1 s + 2 s drain, not 6 s
    end, 40)
  end)

  -- Regression: the C driver counted the requests still unanswered while draining at the
  -- end as timeouts when --timeout (no byte from the server for that long) ran out inside
  -- the drain; over HTTP/1.1 they are hung (found by review).
  it("the C driver reports requests unanswered at the end as hung, when the timeout ends in the drain too", function()
    run(function()
      local p, url = fake("silent")
      local r = bench({ "--h2", "-t1", "-c1", "-m2", "-d1s", "--timeout", "1.5s", "--json", "-", url }, 20)
      local _, seen = events(p, "request")
      p:stop()
      assert.equal(0, r.code, r.context)
      local doc = decode(r.out)
      assert.equal(2, seen, r.context)
      assert.equal(2, doc.hung, r.context)
      assert.equal(0, doc.errors.timeout, r.context)
    end, 40)
  end)
end)

describe("moonwire bench --h2: regressions", function()
  local hrtime = require("moonwire.core").hrtime
  local hooks = 'request = function() return wrk.format("GET", "/") end'

  -- Regression: the requests answered during the end-of-run drain were counted (after
  -- st.t_end, so Requests/sec grew over a duration that ended before them), on both paths
  -- (found by review; the same bug as over HTTP/1.1).
  it("answers that arrive after -d ends are not requests of the run, on both paths", function()
    run(function()
      local srv = serve(function(_, res)
        local deadline = mw.now() + 0.6
        while mw.now() < deadline do mw.sleep(deadline - mw.now()) end
        res:send("late")
      end)
      local path = script(hooks)
      for _, with_hooks in ipairs({ false, true }) do
        local args = { "--h2", "-t1", "-c1", "-m4", "-d0.3s", "--timeout", "2s", "--json", "-" }
        if with_hooks then args[#args + 1] = "-s" args[#args + 1] = path end
        args[#args + 1] = "http://127.0.0.1:" .. srv.port .. "/"
        local r = bench(args)
        assert.equal(0, r.code, r.context)
        local doc = decode(r.out)
        assert.equal(0, doc.requests, r.context)
        assert.equal(0, doc.bytes, r.context)
        assert.equal(0, doc.rps, r.context)
        assert.equal(0, doc.hung, r.context)
      end
      os.remove(path)
      srv:close(0)
    end, 30)
  end)

  -- Regression: -R gave every thread the same schedule (h2.lua offset each connection, or
  -- stream, within its thread only): the threads' requests went out in pairs (found by
  -- review). They now interleave, and nothing due at or after the end is sent.
  it("-R: the threads' schedules interleave evenly, on both paths", function()
    run(function()
      local arrivals
      local srv = serve(function(_, res)
        arrivals[#arrivals + 1] = hrtime()
        res:send("ok")
      end)
      local path = script(hooks)
      for _, with_hooks in ipairs({ false, true }) do
        arrivals = {}
        local args = { "--h2", "-t2", "-c2", "-d2s", "-R", "2", "--json", "-" }
        if with_hooks then args[#args + 1] = "-s" args[#args + 1] = path end
        args[#args + 1] = "http://127.0.0.1:" .. srv.port .. "/"
        local r = bench(args)
        assert.equal(0, r.code, r.context)
        local doc = decode(r.out)
        assert.equal(4, #arrivals, r.context)   -- due at 0, 0.5, 1 and 1.5 s
        assert.equal(4, doc.requests, r.context)
        table.sort(arrivals)
        for i = 2, #arrivals do
          local gap = (arrivals[i] - arrivals[i - 1]) / 1e9
          assert.is_true(gap > 0.3 and gap < 0.7, ("gap %.3f s"):format(gap) .. r.context)
        end
      end
      os.remove(path)
      srv:close(0)
    end, 40)
  end)

  -- Regression: "read" (and Transfer/sec) counted only the response bodies over HTTP/2,
  -- where over HTTP/1.1 it counts the head and the framing too (found by review). It is now
  -- the frames received for the bench's streams (HEADERS, CONTINUATION and DATA, each with
  -- its 9-byte header), on both paths.
  it("bytes read are the frames received, heads and frame headers included, on both paths", function()
    run(function()
      local srv = serve(function(_, res) res:send("hello") end)
      local path = script(hooks)
      for _, with_hooks in ipairs({ false, true }) do
        local args = { "--h2", "-t1", "-c1", "-m2", "-d0.3s", "--json", "-" }
        if with_hooks then args[#args + 1] = "-s" args[#args + 1] = path end
        args[#args + 1] = "http://127.0.0.1:" .. srv.port .. "/"
        local r = bench(args)
        assert.equal(0, r.code, r.context)
        local doc = decode(r.out)
        assert.is_true(doc.requests > 10, r.context)
        -- a HEADERS frame (9 + at least 1 byte of :status) and a DATA frame (9 + 5) at least
        local per = doc.bytes / doc.requests
        assert.is_true(per >= 24 and per < 300, ("%.1f bytes a request"):format(per) .. r.context)
      end
      os.remove(path)
      srv:close(0)
    end, 30)
  end)

  -- Regression: a request a graceful GOAWAY refused (never processed) was sent again once;
  -- landing on a connection that was itself about to go away (nginx's http2_max_requests),
  -- it was refused again and counted a read error (found by review). A request the server
  -- never processed now goes again without using up its retry.
  it("requests a graceful GOAWAY did not process go again, however many connections go away", function()
    run(function()
      local path = script(hooks)
      for _, with_hooks in ipairs({ false, true }) do
        -- every connection, as nginx's after http2_max_requests, answers one request and
        -- sends a graceful GOAWAY that leaves the next three unprocessed
        local p, url = fake("goaway_each")
        local args = { "--h2", "-t1", "-c1", "-m4", "-d1s", "--json", "-" }
        if with_hooks then args[#args + 1] = "-s" args[#args + 1] = path end
        args[#args + 1] = url
        local r = bench(args)
        local conns = 0
        for c in pairs(events(p, "request")) do conns = math.max(conns, c) end
        p:stop()
        assert.equal(0, r.code, r.context)
        local doc = decode(r.out)
        assert.is_true(conns >= 3, conns .. " connections" .. r.context)
        assert.same({ connect = 0, read = 0, write = 0, status = 0, timeout = 0 }, doc.errors, r.context)
        assert.is_true(doc.requests >= conns - 1, r.context)    -- one answer a connection
        assert.is_true(doc.hung <= 4, r.context)                -- (the refused ones left at the end)
      end
      os.remove(path)
    end, 40)
  end)
end)
