-- HTTP/2 client (docs/client.md, src/h2client.c) against our own HTTP/2 server (prior
-- knowledge on cleartext, ALPN on TLS), a scripted python3-h2 server (GOAWAY and
-- REFUSED_STREAM retries), nghttpd (TLS with the test CA, trailers) and nginx (http2 on a
-- TLS listener): GET/POST, 10 MiB streamed both ways under flow control, 100 tasks over one
-- connection, the server's MAX_CONCURRENT_STREAMS respected, trailers both ways, a
-- gRPC-style exchange, resets. Servers listen on 127.0.0.1 port 0; only loopback traffic.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"
local procs = require "spec.peers.procs"

local MiB = 1024 * 1024

local function serve(handler, opts)
  opts = opts or {}
  opts.host, opts.port, opts.handler = "127.0.0.1", 0, handler
  opts.error_log = opts.error_log or function() end
  return assert(http.server(opts))
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

local function base(srv) return "http://127.0.0.1:" .. srv.port end

-- a gRPC message frame: compressed flag 0, 4-byte big-endian length, the message
local function grpc_frame(msg) return string.pack(">B I4", 0, #msg) .. msg end

describe("http2 client against our server", function()
  it("GET by prior knowledge: status, headers, body, version 2", function()
    run(function()
      local srv = serve(function(req, res)
        res:header("x-proto", req.version)
        res:send("hello " .. req.method)
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local res = assert(c:get(base(srv) .. "/x"))
      assert.equal(200, res.status)
      assert.equal("2", res.version)
      assert.equal("2", res.headers["X-Proto"])
      assert.equal("hello GET", res:body())
      -- a second request goes on the same connection
      assert.equal("hello GET", assert(c:get(base(srv) .. "/y")):body())
      assert.equal(1, c:stats().h2_opened)
      -- http2 = false on the request: HTTP/1.1
      local r1 = assert(c:request{ url = base(srv) .. "/z", http2 = false })
      assert.equal("1.1", r1.version)
      assert.equal("1.1", r1.headers["x-proto"])
      r1:body()
      c:close()
    end)
  end)

  it("a response field sent more than once: joined in headers, every value in header_list, as on HTTP/1.1",
    function()
    run(function()
      local srv = serve(function(_, res)
        res:header("x-r", "1")
        res:header("x-r", "2")
        res:header("x-r", "3")
        res:header("x-once", "a")
        res:send("ok")
      end)
      local _ <close> = guard(srv)
      local got = {}
      for _, h2 in ipairs { true, false } do
        local res = assert(http.request { url = base(srv) .. "/", http2 = h2 })
        assert.equal(h2 and "2" or "1.1", res.version)
        got[#got + 1] = { res.headers["x-r"], res:header_list("x-r"), res:header_list("x-once"), res:body() }
      end
      assert.same({ "1, 2, 3", { "1", "2", "3" }, { "a" }, "ok" }, got[1])
      assert.same(got[2], got[1])
    end)
  end)

  it("POST 10 MiB streamed both ways, flow-controlled, in chunks", function()
    run(function()
      local got_in = 0
      local srv = serve(function(req, res)
        for chunk in req:body_reader() do got_in = got_in + #chunk end
        local piece = ("y"):rep(64 * 1024)
        for _ = 1, 160 do assert(res:write(piece)) end
        res:finish()
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local sent = 0
      local piece = ("x"):rep(64 * 1024)
      local res = assert(c:request{ method = "POST", url = base(srv) .. "/up", body = function()
        if sent >= 10 * MiB then return nil end
        sent = sent + #piece
        return piece
      end })
      assert.equal(200, res.status)
      assert.equal(10 * MiB, got_in)
      local n, chunks = 0, 0
      for chunk in res:body_reader() do
        n, chunks = n + #chunk, chunks + 1
        assert.is_true(#chunk <= MiB, "a chunk above one stream window")
      end
      assert.equal(10 * MiB, n)
      assert.is_true(chunks > 10)
      c:close()
    end, 30)
  end)

  it("a response nobody reads holds at most one stream window (the server's writer stalls)", function()
    run(function()
      local written = 0
      local srv = serve(function(_, res)
        local piece = ("z"):rep(64 * 1024)
        for _ = 1, 64 do
          if not res:write(piece) then return end
          written = written + #piece
        end
        res:finish()
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true, h2_stream_window = 256 * 1024 }
      local res = assert(c:get(base(srv) .. "/big"))
      mw.sleep(0.3)
      -- the stream window (256 KiB) plus what the server's stream buffers (64 KiB + a frame)
      assert.is_true(written <= 512 * 1024, "the server wrote " .. written .. " bytes nobody read")
      assert.equal(4 * MiB, #assert(res:body()))
      c:close()
    end)
  end)

  it("100 tasks share one connection (one TCP connection seen by the server)", function()
    run(function()
      local ports = {}
      local srv = serve(function(req, res)
        ports[req.remote_port] = true
        mw.sleep(0.01)
        res:send(req.path)
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local tasks = {}
      for i = 1, 100 do
        tasks[i] = mw.spawn(function()
          local res = assert(c:get(base(srv) .. "/t" .. i))
          return res:body()
        end)
      end
      for i = 1, 100 do assert.equal("/t" .. i, select(2, tasks[i]:join())) end
      local n = 0
      for _ in pairs(ports) do n = n + 1 end
      assert.equal(1, n)
      assert.equal(1, c:stats().h2_opened)
      c:close()
    end)
  end)

  it("tasks whose requests wait (for the connection, for a stream) each send their own head and body", function()
    -- the requests are made before the connection exists, so all but one wait in the
    -- client; each has its own header value and a body of its own length
    run(function()
      local srv = serve(function(req, res)
        local body = assert(req:body())
        res:send(("%s %s %s"):format(req.headers["x-task"], req.headers["content-length"], body))
      end, { http2 = { max_streams = 3 } })
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local tasks = {}
      for i = 1, 30 do
        tasks[i] = mw.spawn(function()
          local res = assert(c:request{ method = "POST", url = base(srv) .. "/echo",
            headers = { ["x-task"] = "t" .. i }, body = ("b"):rep(i) })
          return res:body()
        end)
      end
      for i = 1, 30 do
        local ok, body = tasks[i]:join()
        assert(ok, body)
        assert.equal(("t%d %d %s"):format(i, i, ("b"):rep(i)), body)
      end
      assert.equal(1, c:stats().h2_opened)
      c:close()
    end)
  end)

  it("a request given up while it waits for a stream slot, its response collected: the connection goes on",
    function()
    -- MAX_CONCURRENT_STREAMS 1: the second request's HEADERS waits in nghttp2's queue; it
    -- times out, is cancelled and its stream object collected; when the slot frees, nghttp2
    -- drops the cancelled HEADERS (on_frame_not_send, then on_stream_close for the same
    -- stream: the stream must be let go once)
    run(function()
      local srv = serve(function(req, res)
        if req.path == "/slow" then mw.sleep(0.3) end
        res:send(req.path)
      end, { http2 = { max_streams = 1 } })
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      assert.equal("/warm", assert(c:get(base(srv) .. "/warm")):body())   -- SETTINGS seen
      local slow = mw.spawn(function() return assert(c:get(base(srv) .. "/slow")):body() end)
      mw.sleep(0.05)
      local res, err, code = c:request{ url = base(srv) .. "/queued", timeout = 0.1 }
      assert.is_nil(res)
      assert.equal("timeout", code, err)
      collectgarbage()
      collectgarbage()
      assert.equal("/slow", select(2, slow:join()))
      assert.equal("/after", assert(c:get(base(srv) .. "/after")):body())
      assert.equal(1, c:stats().h2_opened)
      c:close()
    end)
  end)

  it("80 bodies of 1 MiB read whole one after another on one connection: each byte's window goes back once", function()
    -- (the window of a body read whole was given back twice: past 2^31 bytes of surplus,
    -- nghttp2 ended the connection with FLOW_CONTROL_ERROR, at the 63rd MiB)
    run(function()
      local piece = ("y"):rep(MiB)
      local srv = serve(function(_, res) res:send(piece) end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      for i = 1, 80 do
        local res = assert(c:get(base(srv) .. "/" .. i))
        assert.equal(MiB, #assert(res:body()))
      end
      assert.equal(1, c:stats().h2_opened)
      c:close()
    end, 60)
  end)

  it("responses closed or collected unread give their bytes of the connection window back", function()
    -- 2 x 40 responses of 256 KiB left unread (20 MiB, past the 16 MiB connection window):
    -- a later body still comes
    run(function()
      local piece = ("y"):rep(256 * 1024)
      local srv = serve(function(_, res) res:send(piece) end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true, timeout = 5 }
      for _ = 1, 40 do
        local a = assert(c:get(base(srv) .. "/a"))
        local b = assert(c:get(base(srv) .. "/b"))   -- takes in a's whole body meanwhile
        local n = 0
        for chunk in b:body_reader() do n = n + #chunk end
        assert.equal(#piece, n)
        a:close()
      end
      for i = 1, 40 do
        assert(c:get(base(srv) .. "/dropped"))
        if i % 10 == 0 then collectgarbage() collectgarbage() end
      end
      collectgarbage()
      collectgarbage()
      assert.equal(#piece, #assert(c:get(base(srv) .. "/last")):body())
      assert.equal(1, c:stats().h2_opened)
      c:close()
    end, 60)
  end)

  it("a task that read a response sleeps after the response was collected (no stale wait record)", function()
    -- reading took no wait, but left the task's wait record naming the stream; the sleep's
    -- wake ran it on the freed stream (ASan: heap-use-after-free; make test-asan finds it)
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local res = assert(c:get(base(srv) .. "/"))
      assert.equal("ok", res:body())
      res = nil -- luacheck: ignore 311 (the response must be collectable: its register stays marked)
      collectgarbage()
      collectgarbage()
      mw.sleep(0.01)
      assert.equal("ok", assert(c:get(base(srv) .. "/")):body())
      c:close()
    end)
  end)

  it("a connect that raises leaves the origin's pool free: the next request raises too, it does not wait", function()
    run(function()
      local srv = serve(function(_, res) res:send("ok") end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true, local_host = "not-an-address", timeout = 5 }
      for _ = 1, 2 do
        local ok, err = pcall(c.get, c, base(srv) .. "/")
        assert.is_false(ok)
        assert.matches("local_host", err)
      end
    end)
  end)

  it("respects the server's MAX_CONCURRENT_STREAMS (5): requests wait for a free stream", function()
    run(function()
      local now, peak = 0, 0
      local srv = serve(function(_, res)
        now = now + 1
        if now > peak then peak = now end
        mw.sleep(0.02)
        now = now - 1
        res:send("ok")
      end, { http2 = { max_streams = 5 } })
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local tasks = {}
      for i = 1, 40 do
        tasks[i] = mw.spawn(function()
          local res, err, code = c:get(base(srv) .. "/m" .. i)
          if not res then return nil, err, code end
          return res:body()
        end)
      end
      for i = 1, 40 do
        local ok, body, err = tasks[i]:join()
        assert.is_true(ok)
        assert.equal("ok", body, tostring(err))
      end
      assert.equal(5, peak)
      c:close()
    end)
  end)

  it("response trailers after the body; request trailers with a streamed body", function()
    run(function()
      local seen_trailers
      local srv = serve(function(req, res)
        req:body()
        seen_trailers = req.trailers
        res:trailer("x-checksum", "abc123")
        res:trailer("x-count", "2")
        res:write("part1,")
        res:write("part2")
        res:finish()
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local parts = { "a", "b" }
      local res = assert(c:request{ method = "POST", url = base(srv) .. "/tr",
        body = function() return table.remove(parts, 1) end,
        trailers = function() return { ["x-sent"] = "2 parts" } end })
      assert.is_nil(res.trailers)
      assert.equal("part1,part2", res:body())
      assert.equal("abc123", res.trailers["x-checksum"])
      assert.equal("2", res.trailers["X-Count"])
      assert.equal("2 parts", seen_trailers and seen_trailers["x-sent"])
      c:close()
    end)
  end)

  -- nghttp2 would drop a HEADERS over its 64 KiB bound and call it refused: the request
  -- fails as too large instead, and is not sent again.
  it("a request head or trailers too large for HTTP/2 fail with 'toolarge', never retried", function()
    run(function()
      local seen = {}
      local srv = serve(function(req, res)
        seen[req.path] = (seen[req.path] or 0) + 1
        req:body()
        res:send("ok")
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local big = string.rep("v", 70000)
      local res, err, code = c:request{ url = base(srv) .. "/h", headers = { ["x-big"] = big } }
      assert.is_nil(res)
      assert.equal("toolarge", code)
      assert.matches("request head too large for HTTP/2", err)
      local parts = { "a" }
      res, err, code = c:request{ method = "POST", url = base(srv) .. "/t",
        body = function() return table.remove(parts, 1) end, trailers = { ["x-big"] = big } }
      assert.is_nil(res)
      assert.equal("toolarge", code)
      assert.matches("trailer fields too large for HTTP/2", err)
      local many = {}
      for i = 1, 65 do many["x-t" .. i] = "v" end
      res, err, code = c:request{ method = "POST", url = base(srv) .. "/t", body = "x", trailers = many }
      assert.is_nil(res)
      assert.equal("toolarge", code)
      assert.matches("too many trailer fields", err)
      -- the connection goes on; the head too large never went out, nor went again
      res = assert(c:request{ url = base(srv) .. "/ok", headers = { ["x-small"] = "v" } })
      assert.equal("ok", res:body())
      assert.is_nil(seen["/h"])
      assert.equal(1, seen["/ok"])
      assert.equal(1, c:stats().h2_opened)          -- no new connection for a retry
      c:close()
    end)
  end)

  it("a gRPC-style exchange: length-prefixed messages, te: trailers, grpc-status trailer", function()
    run(function()
      local srv = serve(function(req, res)
        assert(req.headers["content-type"] == "application/grpc")
        assert(req.headers.te == "trailers")
        local body = req:body()
        local flag, len = string.unpack(">B I4", body)
        local msg = body:sub(6, 5 + len)
        res:header("content-type", "application/grpc")
        res:trailer("grpc-status", "0")
        res:trailer("grpc-message", "OK")
        res:write(grpc_frame("echo:" .. msg .. ":" .. flag))
        res:finish()
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local frame = grpc_frame("ping")
      local sent = false
      local res = assert(c:request{ method = "POST", url = base(srv) .. "/pkg.Echo/Say",
        headers = { ["content-type"] = "application/grpc", te = "trailers" },
        body = function()
          if sent then return nil end
          sent = true
          return frame
        end })
      assert.equal(200, res.status)
      assert.equal("application/grpc", res.headers["content-type"])
      local reply = res:body()
      local flag, len = string.unpack(">B I4", reply)
      assert.equal(0, flag)
      assert.equal("echo:ping:0", reply:sub(6, 5 + len))
      assert.equal("0", res.trailers["grpc-status"])
      assert.equal("OK", res.trailers["grpc-message"])
      c:close()
    end)
  end)

  it("a stream reset by the server: nil, msg, 'reset'; the connection goes on", function()
    run(function()
      local srv = serve(function(req, res)
        if req.path == "/boom" then
          res:write("partial")
          error("handler failed")
        end
        res:send("fine")
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local res = assert(c:get(base(srv) .. "/boom"))
      local body, err, code = res:body()
      assert.is_nil(body)
      assert.equal("reset", code)
      assert.matches("INTERNAL_ERROR", err)
      assert.equal("fine", assert(c:get(base(srv) .. "/ok")):body())
      assert.equal(1, c:stats().h2_opened)
      c:close()
    end)
  end)

  -- Regression: conn:close() (client:close()) woke the tasks parked on streams but not the
  -- one driving the connection, parked on its socket: that one waited for its response or
  -- deadline.
  it("client:close() ends every request on the connection at once, the driving task's too", function()
    run(function()
      local srv = serve(function(req, res)
        if req.path ~= "/warm" then mw.sleep(1.5) end
        res:send(req.path)
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true, timeout = 5 }
      assert(c:get(base(srv) .. "/warm")):body()
      local function get(path)
        local res, err, code = c:get(base(srv) .. path)
        return res and res:body(), err, code
      end
      local a, b = mw.spawn(get, "/a"), mw.spawn(get, "/b")
      mw.sleep(0.1)
      c:close()
      for _, t in ipairs{ a, b } do
        local ok, body, err, code = t:join(0.7)
        assert.is_true(ok, tostring(body))
        assert.is_nil(body)
        assert.equal("closed", code, err)
      end
    end)
  end)

  -- Regression: idle_timeout was only applied to HTTP/1.1 connections; a pooled HTTP/2 one
  -- was reused however long it sat idle.
  it("a pooled connection idle for idle_timeout is closed and a new one opened", function()
    run(function()
      local srv = serve(function(req, res) res:send(req.path) end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true, idle_timeout = 0.3 }
      assert.equal("/x", assert(c:get(base(srv) .. "/x")):body())
      assert.equal("/y", assert(c:get(base(srv) .. "/y")):body())
      assert.equal(1, c:stats().h2_opened)       -- in use: kept
      mw.sleep(0.5)
      assert.equal("/z", assert(c:get(base(srv) .. "/z")):body())
      assert.equal(2, c:stats().h2_opened)
      assert.equal(1, c:stats().h2)
      c:close()
    end)
  end)

  it("timeouts as in HTTP/1.1: nil, 'timeout', 'timeout'", function()
    run(function()
      local srv = serve(function(_, res)
        mw.sleep(1)
        res:send("late")
      end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      local res, err, code = c:request{ url = base(srv) .. "/slow", timeout = 0.1 }
      assert.is_nil(res)
      assert.equal("timeout", code, err)
      c:close()
    end)
  end)
end)

-- Regression: over HTTP/2 the client sent what HTTP/1.1's request_head refuses: header
-- values with CR, LF or NUL, names that are no token, a method with spaces and line breaks, a
-- Host (our :authority) with a line break, request trailers alike; build_nv (h2client.c) and
-- trailer_pairs checked nothing. Both versions now check with one validator
-- (mw_http_check_field, mw_http_check_method in http.c), raising the same message; the
-- fields HTTP/2 itself forbids are still lower-cased or dropped, not refused.
describe("http2 client: request fields checked as in HTTP/1.1", function()
  local cases = {
    { "CR LF in a value", { headers = { ["X-A"] = "a\r\nInjected: 1" } },
      "invalid value for header 'X-A' (CR, LF or NUL)" },
    { "a NUL in a value", { headers = { ["x-a"] = "a\0b" } }, "invalid value for header 'x-a' (CR, LF or NUL)" },
    { "CR LF in a name", { headers = { ["X-B\r\nInj"] = "b" } }, "invalid header name 'X-B\r\nInj'" },
    { "a name with a colon", { headers = { ["x:y"] = "b" } }, "invalid header name 'x:y'" },
    { "an empty name", { headers = { [""] = "b" } }, "empty header name" },
    { "a method with a line break", { method = "GET /evil HTTP/1.1\r\nX:" },
      "invalid method 'GET /EVIL HTTP/1.1\r\nX:'" },
    { "an empty method", { method = "" }, "empty method" },
    { "CR LF in Host (:authority)", { headers = { Host = "h\r\nInjHost: 1" } },
      "invalid value for header 'Host' (CR, LF or NUL)" },
    { "CR LF in a trailer", { body = "x", trailers = { ["x-t"] = "a\r\nb" } },
      "invalid value for header 'x-t' (CR, LF or NUL)" },
    { "a trailer name that is no token", { body = "x", trailers = { ["x t"] = "a" } }, "invalid header name 'x t'" },
  }

  it("each misuse raises the same error on HTTP/1.1 and HTTP/2, and no request reaches the server", function()
    run(function()
      local seen, last = 0, nil
      local srv = serve(function(req, res)
        seen, last = seen + 1, req
        res:send("ok")
      end)
      local _ <close> = guard(srv)
      for _, case in ipairs(cases) do
        local name, opts, want = case[1], case[2], case[3]
        local got = {}
        for _, h2 in ipairs{ false, true } do
          local c = http.client{ http2 = h2 }
          local o = { url = base(srv) .. "/x" }
          for k, v in pairs(opts) do o[k] = v end
          local ok, err = pcall(c.request, c, o)
          assert.is_false(ok, name .. (h2 and " (HTTP/2)" or " (HTTP/1.1)") .. " did not raise")
          got[#got + 1] = tostring(err):gsub("^[^\n]-:%d+: ", "")
          c:close()
        end
        assert.same({ want, want }, got, name)
      end
      assert.equal(0, seen)
      -- what HTTP/2 forbids but HTTP/1.1 sends: names lower-cased, connection-specific fields
      -- dropped (as before), never refused
      local c = http.client{ http2 = true }
      local res = assert(c:request{ url = base(srv) .. "/ok", headers = { ["X-Upper"] = "v",
        Connection = "close", ["Keep-Alive"] = "5", ["Proxy-Connection"] = "x" } })
      assert.equal("2", res.version)
      assert.equal("ok", res:body())
      assert.equal(1, seen)
      assert.equal("v", rawget(last.headers, "x-upper"))
      assert.is_nil(last.headers.connection)
      assert.is_nil(last.headers["keep-alive"])
      assert.is_nil(last.headers["proxy-connection"])
      c:close()
    end)
  end)

  it("a trailers function that gives a bad field raises over HTTP/2; the connection serves on", function()
    run(function()
      local srv = serve(function(req, res) res:send(req:body() or "") end)
      local _ <close> = guard(srv)
      local c = http.client{ http2 = true }
      helper.raises("invalid header name 'x y'", c.request, c, { url = base(srv) .. "/t",
        body = function() return nil end, trailers = function() return { ["x y"] = "1" } end })
      -- the connection goes on serving
      assert.equal("ok", assert(c:post(base(srv) .. "/t", "ok")):body())
      c:close()
    end)
  end)
end)

describe("http2 client retries", function()
  local function fake(mode)
    local p = procs.start("h2_fake_server", procs.PYTHON .. " " .. procs.peers .. "/h2_fake_server.py " .. mode, 30)
    local ev = p:wait_event(function(e) return e.event == "listening" end)
    return p, "http://127.0.0.1:" .. ev.port
  end

  -- GETs of url/r1 .. url/rN, each in its task (`gap` seconds apart): the tasks, whose join
  -- gives true, body | true, nil, err, code
  local function spawn_gets(c, url, n, gap)
    local tasks = {}
    for i = 1, n do
      tasks[i] = mw.spawn(function()
        local res, err, code = c:get(url .. "/r" .. i)
        if not res then return nil, err, code end
        return res:body()
      end)
      if gap then mw.sleep(gap) end
    end
    return tasks
  end

  -- tasks[from .. to] were answered on the fake server's second connection
  local function on_second_conn(tasks, from, to)
    for i = from, to do
      local ok, body, err = tasks[i]:join()
      assert.is_true(ok)
      assert.matches("^conn=2 ", body or tostring(err))
    end
  end

  it("requests above a GOAWAY's last stream id are retried on a new connection", function()
    run(function()
      local p, url = fake("goaway")
      local _ <close> = p
      local c = http.client{ http2 = true }
      assert.equal("conn=1 stream=1", assert(c:get(url .. "/first")):body())
      on_second_conn(spawn_gets(c, url, 3), 1, 3)
      assert.equal(2, c:stats().h2_opened)
      c:close()
    end, 20)
  end)

  it("a connection that drops without GOAWAY: requests never sent go again on a new one, the sent one fails", function()
    run(function()
      local p, url = fake("drop")
      local _ <close> = p
      local c = http.client{ http2 = true }
      -- r1 goes out first; r2, r3 wait for the only stream slot
      local tasks = spawn_gets(c, url, 3, 0.02)
      local ok, body, err, code = tasks[1]:join()
      assert.is_true(ok)
      assert.is_nil(body)                  -- sent, maybe processed: not retried
      assert.truthy(code == "closed" or code == "ECONNRESET", tostring(code) .. " " .. tostring(err))
      on_second_conn(tasks, 2, 3)
      assert.equal(2, c:stats().h2_opened)
      c:close()
    end, 20)
  end)

  -- Regression: a GOAWAY only set a flag, so requests whose HEADERS still waited in
  -- nghttp2's queue (for the one stream slot a long download held) were neither woken nor
  -- failed: they waited for their own timeout instead of going again on a new connection.
  -- The retired connection also kept its descriptor after its last stream ended.
  it("requests queued behind a long download when a GOAWAY comes go at once on a new connection", function()
    run(function()
      local p, url = fake("goaway_queued")
      local _ <close> = p
      -- no collection meanwhile: only a close may end the first connection
      collectgarbage("stop")
      local _gc <close> = setmetatable({}, { __close = function() collectgarbage("restart") end })
      local c = http.client{ http2 = true, timeout = 5 }
      local long_done
      local long = mw.spawn(function()
        local res = assert(c:get(url .. "/long"))
        local body, err = res:body()
        long_done = mw.now()
        return body, err
      end)
      -- stream 1 is open: the next requests wait for its slot
      p:wait_event(function(e) return e.event == "request" and e.path == "/long" end)
      local t0 = mw.now()
      local tasks = spawn_gets(c, url, 3)
      on_second_conn(tasks, 1, 3)
      assert.is_nil(long_done)             -- answered before the long download ended
      assert.is_true(mw.now() - t0 < 0.9)
      local ok, body = long:join(3)
      assert.is_true(ok)
      assert.equal("ab", body)             -- stream 1 was below the GOAWAY's last stream id
      assert.equal(2, c:stats().h2_opened)
      -- its last stream ended: the retired connection closes (not when collected)
      p:wait_event(function(e) return e.event == "closed" and e.conn == "1" end, 2)
      c:close()
    end, 20)
  end)

  -- A server that breaks the protocol on one request's stream (h2_fake_server.py's mode):
  -- that request fails with code `code`, its message matching `pattern`; with `after`, the
  -- connection goes on and answers the next request so.
  -- - a PUSH_PROMISE though ENABLE_PUSH is 0 (regression: nghttp2 answers it with its own
  --   GOAWAY PROTOCOL_ERROR, and the request failed with "closed" as if the server had hung up);
  -- - a :status outside 100..599 (RFC 9110 §15; nghttp2 takes any three digits), as on
  --   HTTP/1.1: the stream is reset.
  for _, case in ipairs{
    { mode = "push", path = "/x", code = "http2", pattern = "PROTOCOL_ERROR" },
    { mode = "status600", path = "/600", code = "http", pattern = "bad status code", after = "conn=1 stream=3" },
  } do
    it(("a server in mode %s: nil, msg, %q%s"):format(case.mode, case.code,
      case.after and "; the connection goes on" or ""), function()
      run(function()
        local p, url = fake(case.mode)
        local _ <close> = p
        local c = http.client{ http2 = true, timeout = 5 }
        local res, err, code = c:get(url .. case.path)
        assert.is_nil(res)
        assert.equal(case.code, code, err)
        assert.matches(case.pattern, err)
        if case.after then assert.equal(case.after, assert(c:get(url .. "/ok")):body()) end
        c:close()
      end, 20)
    end)
  end

  -- A response whose DATA does not match its content-length: nghttp2 resets the stream
  -- itself; the body read fails with code "http" (malformed), not "reset", which says the
  -- server reset it (regression, found by review); the connection goes on.
  it("a content-length the DATA does not match (more, less): the body fails with code 'http'", function()
    run(function()
      local p, url = fake("badlen")
      local _ <close> = p
      local c = http.client{ http2 = true, timeout = 5 }
      for _, path in ipairs{ "/more", "/less" } do
        local res = assert(c:get(url .. path))
        local body, err, code = res:body()
        assert.is_nil(body, path)
        assert.equal("http", code, err)
        assert.matches("malformed", err)
      end
      assert.equal(200, assert(c:get(url .. "/ok")).status)
      c:close()
    end, 20)
  end)

  -- Regression (found by review): the request's deadline was checked only inside a wait, so
  -- a server that always had bytes waiting (empty DATA frames without end) held the request
  -- past its timeout, and the task never yielded: no other task ran (HTTP/1.1's client checks
  -- it between reads, and so does this one now). And at most 16 interim responses are taken
  -- before the final one, as over HTTP/1.1.
  it("a server that never stops sending: the timeout holds and other tasks run; 16 interim responses at most",
    function()
    run(function()
      local p, url = fake("hints")
      local _ <close> = p
      local ticks, ticking = 0, true
      local ticker = mw.spawn(function()
        while ticking do ticks = ticks + 1; mw.sleep(0.05) end
      end)
      local c = http.client{ http2 = true, timeout = 5 }
      local res = assert(c:get(url .. "/datafree", { timeout = 1 }))
      assert.equal(200, res.status)
      local t0 = mw.now()
      local body, err, code = res:body()
      local took = mw.now() - t0
      assert.is_nil(body)
      assert.equal("timeout", code, err)
      assert.is_true(took < 2, "the body read took " .. took .. " s")
      assert.is_true(ticks >= 5, "the other task ran " .. ticks .. " times")
      ticking = false
      ticker:join()
      c:close()               -- (the server's connection floods on: a new one for the rest)
      local c2 = http.client{ http2 = true, timeout = 5 }
      local ok = assert(c2:get(url .. "/h16"))
      assert.equal(200, ok.status)
      local bad, berr, bcode = c2:get(url .. "/h17")
      assert.is_nil(bad)
      assert.equal("http", bcode, berr)
      assert.matches("interim", berr)
      c2:close()
    end, 20)
  end)

  -- Regression (found by review): a request that timed out while its HEADERS waited for a
  -- stream slot (a server whose MAX_CONCURRENT_STREAMS is 0) kept its body and counted as
  -- unfinished until a slot freed, which here is never: every such request added to the
  -- connection for good (~7 KiB each with a 2 KB body), and it never idled out. Now it is
  -- abandoned (its body freed, not counted), and past 32 of them the connection is retired.
  it("requests given up while waiting for a stream slot: not counted, the connection retired past 32", function()
    run(function()
      local p, url = fake("mcs0")
      local _ <close> = p
      local c = http.client{ http2 = true }
      local body = ("x"):rep(2000)
      for i = 1, 100 do
        local res, err, code = c:request{ method = "PUT", url = url .. "/r" .. i, body = body, timeout = 0.02 }
        assert.is_nil(res)
        assert.equal("timeout", code, err)
      end
      collectgarbage(); collectgarbage()
      local st = c:stats()
      assert.is_true(st.h2_streams <= 32, "unfinished streams: " .. st.h2_streams)
      assert.is_true(st.h2_opened >= 3, "connections opened: " .. st.h2_opened)
      c:close()
    end, 20)
  end)

  -- Regression: a streamed request body whose write failed (the task cancelled, out of
  -- time) went on to wait for the response head: up to the request's deadline, and a
  -- cancelled task could even get the response as a success.
  it("a task cancelled while its streamed body waits for the server's window returns 'cancelled' at once",
    function()
    run(function()
      local p, url = fake("window0")
      local _ <close> = p
      local c = http.client{ http2 = true, timeout = 5 }
      assert.matches("^conn=1 ", assert(c:get(url .. "/warm")):body())   -- the SETTINGS (window 0) seen
      local chunks = 0
      local t = mw.spawn(function()
        local res, err, code = c:request{ method = "POST", url = url .. "/up", body = function()
          chunks = chunks + 1
          if chunks > 20 then return nil end
          return string.rep("q", 16384)
        end }
        return res, err, code
      end)
      -- 64 KiB queued: the writer waits for a window that never opens
      assert(procs.wait_for(function() return chunks >= 4 end, 3))
      p:wait_event(function(e) return e.event == "request" and e.path == "/up" end)
      t:cancel()
      local ok, res, err, code = t:join(1)
      assert.is_true(ok, tostring(res))
      assert.is_nil(res)
      assert.equal("cancelled", code, err)
      -- the connection goes on
      assert.matches("^conn=1 ", assert(c:get(url .. "/after")):body())
      c:close()
    end, 20)
  end)

  it("a REFUSED_STREAM reset is retried once", function()
    run(function()
      local p, url = fake("refuse")
      local _ <close> = p
      local c = http.client{ http2 = true }
      local res = assert(c:get(url .. "/a"))
      assert.equal("conn=1 stream=3", res:body())
      local n = 0
      for _, e in ipairs(p:events()) do if e.event == "request" then n = n + 1 end end
      assert.equal(2, n)
      c:close()
    end, 20)
  end)
end)

describe("http2 client over TLS (ALPN)", function()
  local D
  setup(function()
    D = os.tmpname()
    os.remove(D)
    assert(os.execute(("%s/fixtures/make-certs %s >/dev/null 2>&1"):format(procs.root .. "/spec", D)))
  end)
  teardown(function() if D then os.execute("rm -rf " .. D) end end)

  it("https to our server negotiates h2; http2 = false keeps HTTP/1.1", function()
    run(function()
      local srv = serve(function(req, res) res:send(req.version) end,
        { tls = { cert = D .. "/server-chain.pem", key = D .. "/server.key" } })
      local _ <close> = guard(srv)
      local c = http.client{ tls = { cafile = D .. "/ca.pem" } }
      local url = "https://localhost:" .. srv.port .. "/"
      local res = assert(c:get(url))
      assert.equal("2", res.version)
      assert.equal("2", res:body())
      local r1 = assert(c:request{ url = url, http2 = false })
      assert.equal("1.1", r1.version)
      assert.equal("1.1", r1:body())
      c:close()
    end)
  end)

  it("against nghttpd: GET, POST echo, response trailers", function()
    run(function()
      local port = helper.free_port()
      local www = D .. "/www"
      os.execute("mkdir -p " .. www)
      local f = assert(io.open(www .. "/index.html", "w"))
      f:write(("0123456789"):rep(100000))
      f:close()
      local p = procs.start("nghttpd",
        ("/usr/sbin/nghttpd --address=127.0.0.1 -d %s --echo-upload --trailer 'x-tr: yes' %d %s %s")
          :format(www, port, D .. "/server.key", D .. "/server-chain.pem"), 30)
      local _ <close> = p
      assert(procs.wait_for(function()
        local s = mw.tcp.connect("127.0.0.1", port, { timeout = 1 })
        if s then s:close() return true end
      end, 10))
      local c = http.client{ tls = { cafile = D .. "/ca.pem" } }
      local url = "https://localhost:" .. port
      local res = assert(c:get(url .. "/index.html"))
      assert.equal(200, res.status)
      assert.equal("2", res.version)
      assert.equal(1000000, #res:body())
      assert.equal("yes", res.trailers and res.trailers["x-tr"])
      local body = ("p"):rep(3 * MiB)
      res = assert(c:post(url .. "/echo", body))
      assert.equal(200, res.status)
      assert.equal(body, res:body())
      assert.equal(1, c:stats().h2_opened)
      c:close()
    end, 30)
  end)

  it("against nginx (listen ssl http2): 200 requests from 20 tasks on one connection", function()
    run(function()
      local dir = D .. "/nginx"
      local port = helper.free_port()
      os.execute(("mkdir -p %s/tmp %s/www"):format(dir, dir))
      local conf = ([[
daemon off;
master_process off;
worker_processes 1;
error_log DIR/error.log;
pid DIR/nginx.pid;
events { worker_connections 256; }
http {
  log_format mw '$connection $connection_requests "$request" $status';
  access_log DIR/access.log mw;
  client_body_temp_path DIR/tmp/body;
  proxy_temp_path DIR/tmp/proxy;
  fastcgi_temp_path DIR/tmp/fastcgi;
  uwsgi_temp_path DIR/tmp/uwsgi;
  scgi_temp_path DIR/tmp/scgi;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:PORT ssl http2;
    ssl_certificate CERTS/server-chain.pem;
    ssl_certificate_key CERTS/server.key;
    location = /ok { return 200 "ok $server_protocol"; }
  }
}
]]):gsub("DIR", dir):gsub("PORT", tostring(port)):gsub("CERTS", D)
      local f = assert(io.open(dir .. "/nginx.conf", "w"))
      f:write(conf)
      f:close()
      local p = procs.start("nginx", ("/usr/sbin/nginx -c %s/nginx.conf -p %s"):format(dir, dir), 60)
      local _ <close> = p
      assert(procs.wait_for(function()
        local s = mw.tcp.connect("127.0.0.1", port, { timeout = 1 })
        if s then s:close() return true end
      end, 10), "nginx did not start")
      local c = http.client{ tls = { cafile = D .. "/ca.pem" } }
      local tasks = {}
      for i = 1, 20 do
        tasks[i] = mw.spawn(function()
          for _ = 1, 10 do
            local res = assert(c:get("https://localhost:" .. port .. "/ok"))
            assert.equal("2", res.version)
            assert.equal("ok HTTP/2.0", res:body())
          end
          return true
        end)
      end
      for i = 1, 20 do assert.is_true(tasks[i]:join()) end
      local conns = {}
      local lines = 0
      for line in io.lines(dir .. "/access.log") do
        conns[line:match("^(%d+)")] = true
        lines = lines + 1
      end
      local n = 0
      for _ in pairs(conns) do n = n + 1 end
      assert.equal(200, lines)
      assert.equal(1, n)
      c:close()
    end, 30)
  end)
end)
