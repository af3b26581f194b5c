-- HTTP/1.1 server at scale (DESIGN.md "Concurrency model", "Timeouts"): 2,000 concurrent
-- keep-alive connections with every request in flight at the same moment, and 1,000 slowloris
-- clients trickling request heads while a normal client is still served at once, then cut off
-- by the head timeout (a total, so trickling does not keep them alive).
-- Both ends live in this process (4,000 descriptors, below the 20,000 limit); loopback only.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local function serve(handler, opts)
  opts = opts or {}
  opts.host, opts.port, opts.handler = "127.0.0.1", 0, handler
  opts.backlog = opts.backlog or 4096
  opts.error_log = opts.error_log or function(msg) error("handler error: " .. msg) end
  return assert(http.server(opts))
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

-- Reads one Content-Length-framed response: status code, body.
local function response(s, timeout)
  local line, err = s:read("l", timeout or 10)
  if not line then return nil, err end
  local status = math.tointeger(tonumber(line:match("^HTTP/1%.1 (%d%d%d) ")))
  local len
  repeat
    local h = assert(s:read("l", timeout or 10))
    len = len or h:match("^[Cc]ontent%-[Ll]ength: (%d+)$")
  until h == ""
  len = assert(math.tointeger(tonumber(len)), "no Content-Length")
  return status, len > 0 and assert(s:read(len, timeout or 10)) or ""
end

-- Waits (bounded) until `cond()` holds.
local function wait_for(cond, limit)
  local deadline = mw.now() + (limit or 10)
  while not cond() do
    if mw.now() > deadline then return false end
    mw.sleep(0.01)
  end
  return true
end

describe("http scale", function()
  it("serves 2,000 concurrent keep-alive connections, all 2,000 requests in flight at once", function()
    run(function()
      local N = 2000
      collectgarbage()
      collectgarbage()   -- sockets earlier tests dropped without closing go now, not mid-test
      local fds = helper.fd_count()
      local arrived, requests, ports = 0, 0, {}
      local gate = mw.channel(0)   -- closed when the N-th first request arrives
      local srv = serve(function(req, res)
        requests = requests + 1
        ports[req.remote_port] = true
        if req.path == "/first" then
          arrived = arrived + 1
          if arrived == N then gate:close() else gate:recv(20) end
        end
        res:header("content-type", "text/plain")
        res:send("hello " .. req.path .. " " .. req.remote_port)
      end)
      local _g <close> = guard(srv)
      local socks = {}
      local function client(i, path)
        local s = socks[i]
        if not s then
          s = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 20 }))
          socks[i] = s
        end
        assert(s:write("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        local status, body = response(s, 20)
        local _, port = s:getsockname()
        assert.equal(200, status)
        assert.equal("hello " .. path .. " " .. port, body)
        return true
      end
      local t0 = mw.now()
      local tasks = {}
      for i = 1, N do tasks[i] = mw.spawn(client, i, "/first") end
      for i = 1, N do assert.same({ true, true }, { tasks[i]:join() }) end
      local first_round = mw.now() - t0
      assert.equal(N, arrived)
      -- every connection stayed open (keep-alive) and a second round reuses them all
      assert.equal(N, srv:connections())
      for i = 1, N do tasks[i] = mw.spawn(client, i, "/second") end
      for i = 1, N do assert.same({ true, true }, { tasks[i]:join() }) end
      assert.equal(2 * N, requests)
      local distinct = 0
      for _ in pairs(ports) do distinct = distinct + 1 end
      assert.equal(N, distinct)
      assert.equal(N, srv:connections())
      -- clients go away: the server lets go of every connection and descriptor
      for i = 1, N do socks[i]:close() end
      assert.is_true(wait_for(function() return srv:connections() == 0 end), "connections left: "
        .. srv:connections())
      srv:close()
      socks = nil
      collectgarbage()
      collectgarbage()
      assert.equal(fds, helper.fd_count())
      assert.is_true(first_round < 20, "first round took " .. first_round .. " s")
    end, 60)
  end)

  it("1,000 slowloris clients do not delay a normal request (< 1 s); the head timeout cuts them all off", function()
    run(function()
      local N, HEAD_TIMEOUT = 1000, 2
      local calls = 0
      local srv = serve(function(req, res)
        calls = calls + 1
        res:send("normal " .. req.path)
      end, { timeouts = { head = HEAD_TIMEOUT } })
      local _g <close> = guard(srv)
      local started, ready = 0, mw.channel(0)
      -- each slowloris: a partial head, then a header line every 0.25 s (well inside any
      -- per-read timeout) until the server answers or closes
      local function slowloris()
        local s <close> = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 20 }))
        assert(s:write("GET /slow HTTP/1.1\r\nHost: x\r\n"))
        local t0 = mw.now()
        started = started + 1
        if started == N then ready:close() end
        local got = {}
        for _ = 1, 200 do
          local piece, _, code = s:recv(65536, 0.25)
          if piece then
            got[#got + 1] = piece
          elseif code == "timeout" then
            if not s:write("X-Trickle: 1\r\n") then break end
          else
            break -- closed or reset
          end
        end
        return mw.now() - t0, table.concat(got)
      end
      local tasks = {}
      for i = 1, N do tasks[i] = mw.spawn(slowloris) end
      ready:recv(20)
      assert.equal(N, started)
      assert.is_true(wait_for(function() return srv:connections() >= N end), "accepted "
        .. srv:connections())
      -- a normal client meanwhile
      local t0 = mw.now()
      local s <close> = assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
      assert(s:write("GET /normal HTTP/1.1\r\nHost: x\r\n\r\n"))
      local status, body = response(s, 5)
      local elapsed = mw.now() - t0
      assert.equal(200, status)
      assert.equal("normal /normal", body)
      assert.is_true(elapsed < 1, "normal request took " .. elapsed .. " s")
      assert.equal(N + 1, srv:connections())
      -- every slowloris is cut off around the head timeout, with 408 or a plain close
      local shortest, longest = math.huge, 0
      for i = 1, N do
        local ok, took, data = tasks[i]:join()
        assert.is_true(ok, took)
        if data ~= "" then assert.matches("^HTTP/1%.1 408 ", data) end
        shortest, longest = math.min(shortest, took), math.max(longest, took)
      end
      assert.is_true(shortest >= HEAD_TIMEOUT - 0.1, "a slowloris was cut off after " .. shortest .. " s")
      assert.is_true(longest < HEAD_TIMEOUT + 2, "a slowloris lasted " .. longest .. " s")
      assert.equal(1, calls)
      -- the normal keep-alive connection is still fine afterwards
      assert(s:write("GET /again HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.same({ 200, "normal /again" }, { response(s, 5) })
      srv:close()
    end, 60)
  end)
end)
