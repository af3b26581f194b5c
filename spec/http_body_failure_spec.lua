-- HTTP server: requests whose body fails (docs/http.md "Protocol rules"), over raw sockets.
-- A body with broken chunked framing, over limits.body (by its Content-Length or by a chunk
-- size), that stops arriving (timeouts.body) or whose client went away is never answered 2xx,
-- whatever the handler does (ignores the error and sends, returns, raises; with req:body() or
-- req:body_reader()): the server answers the status the failure carries (400, 413, 408;
-- nothing to a client that is gone) and closes the connection.
-- Then the lingering close: after an error the server shuts its write side down and reads
-- (and drops) what the client still sends, within timeouts.linger and limits.linger, so the
-- answer reaches a client that is still sending instead of being lost to a reset.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local KiB, MiB = 1024, 1024 * 1024

---------------------------------------------------------------------------------------------
-- fixtures

local calls, seen, errors = 0, {}, {}

local function serve(opts, handler)
  opts = opts or {}
  calls, seen, errors = 0, {}, {}
  opts.host, opts.port, opts.handler = "127.0.0.1", 0, handler
  opts.error_log = function(msg) errors[#errors + 1] = msg end
  return assert(http.server(opts))
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

local function connect(srv)
  return assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
end

-- Reads until the peer closes. Returns the bytes and "closed", the bytes so far and
-- "timeout", or the bytes so far and the error code of a failed read (a reset).
local function read_all(s, timeout)
  local parts = {}
  local deadline = mw.now() + (timeout or 5)
  while true do
    local left = deadline - mw.now()
    if left <= 0 then return table.concat(parts), "timeout" end
    local piece, _, code = s:recv(65536, left)
    if not piece then return table.concat(parts), code end
    parts[#parts + 1] = piece
  end
end

local function count_responses(data)
  local n = 0
  for _ in data:gmatch("HTTP/1%.1 %d%d%d ") do n = n + 1 end
  return n
end

local function head(lines)
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

-- waits (bounded) until the server holds no connection
local function drained(srv, limit)
  local deadline = mw.now() + (limit or 5)
  while srv:connections() > 0 do
    if mw.now() > deadline then return false end
    mw.sleep(0.01)
  end
  return true
end

---------------------------------------------------------------------------------------------
-- failed bodies

-- What handlers do with a body that fails. Each records what the read gave it in `seen`.
local handlers = {}

function handlers.ignores(req, res)        -- sends its 200 whatever the body read said
  calls = calls + 1
  local body, err, code = req:body()
  seen[#seen + 1] = { body = body, err = err, code = code }
  res:send("got " .. tostring(body))
end

function handlers.returns(req, res)        -- the common case: returns when the body is nil
  calls = calls + 1
  local body, err, code = req:body()
  seen[#seen + 1] = { body = body, err = err, code = code }
  if not body then return end
  res:send("got " .. body)
end

function handlers.raises(req, res)         -- assert(req:body())
  calls = calls + 1
  local body = assert(req:body())
  res:send("got " .. body)
end

function handlers.sets_then_returns(req, res)  -- set a 200 and headers, then gave up
  calls = calls + 1
  res:status(200):header("x-app", "yes")
  local body = req:body()
  if not body then return end
  res:send("got " .. body)
end

function handlers.streams_raises(req, res)  -- for chunk in req:body_reader(): raises on failure
  calls = calls + 1
  local n = 0
  for chunk in req:body_reader() do n = n + #chunk end
  res:send("got " .. n)
end

function handlers.streams_ignores(req, res) -- catches the reader's error and sends its 200
  calls = calls + 1
  local n = 0
  pcall(function()
    for chunk in req:body_reader() do n = n + #chunk end
  end)
  res:write("got ")
  res:write(tostring(n))
  res:finish()
end

-- The failure classes: server options, the bytes the client sends, whether it then shuts its
-- write side (gone: the server reads the end of the stream in the body), the status expected
-- (nil: no answer at all), and which handlers apply (the streaming reader has no size limit).
local ALL = { "ignores", "returns", "raises", "sets_then_returns", "streams_raises", "streams_ignores" }
local WHOLE = { "ignores", "returns", "raises", "sets_then_returns" }
local failures = {
  { name = "bad chunked framing", status = 400, handlers = ALL,
    bytes = head { "POST /up HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" } .. "5\r\nhello\r\nzz\r\n" },
  { name = "over limits.body by Content-Length", status = 413, handlers = WHOLE, opts = { limits = { body = KiB } },
    bytes = head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 2000" } },
  { name = "over limits.body by chunk sizes", status = 413, handlers = WHOLE, opts = { limits = { body = KiB } },
    bytes = head { "POST /up HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" } .. "200\r\n" .. ("a"):rep(512)
      .. "\r\n400\r\n" },
  { name = "a body that stops arriving (timeouts.body)", status = 408, handlers = ALL,
    opts = { timeouts = { body = 0.3 } },
    bytes = head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 100" } .. ("a"):rep(10) },
  { name = "a client gone in the body", status = nil, handlers = ALL, gone = true,
    bytes = head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 100" } .. ("a"):rep(10) },
}

describe("http server: a request whose body fails", function()
  for _, f in ipairs(failures) do
    for _, hname in ipairs(f.handlers) do
      local expect = f.status and ("answered " .. f.status .. " and closed") or "not answered, closed"
      it(f.name .. ", handler " .. hname .. ": " .. expect, function()
        run(function()
          local opts = {}
          for k, v in pairs(f.opts or {}) do opts[k] = v end
          local srv = serve(opts, handlers[hname])
          local _g <close> = guard(srv)
          local s <close> = connect(srv)
          assert(s:write(f.bytes))
          if f.gone then assert(s:shutdown("write")) end
          local data, how = read_all(s, 5)
          assert.equal("closed", how, "connection left open; got: " .. data)
          assert.equal(1, calls)
          if f.status then
            assert.matches("^HTTP/1%.1 " .. f.status .. " ", data, nil, "expected " .. f.status .. ", got: " .. data)
            assert.equal(1, count_responses(data), "exactly one response expected, got: " .. data)
            assert.matches("\r\nConnection: close\r\n", data, 1, true)
            assert.is_nil(data:find("got ", 1, true), "the handler's answer went out: " .. data)
            assert.is_nil(data:find("x-app", 1, true), "the handler's headers went out: " .. data)
          else
            assert.equal("", data)
          end
          -- the handler saw the failure as before: nil, message, the status (or none)
          local got = seen[1]
          if got then
            assert.is_nil(got.body)
            assert.is_string(got.err)
            if f.status then assert.equal(f.status, got.code) end
          end
          -- a handler that raised: logged, but the answer is the failure's, not 500
          if hname == "raises" or hname == "streams_raises" then assert.equal(1, #errors) end
          s:close()
          assert.is_true(drained(srv))
          srv:close()
        end)
      end)
    end
  end

  it("a handler's own 4xx or 5xx answer to the failure stands (the connection closes after it)", function()
    run(function()
      local srv = serve({ limits = { body = KiB } }, function(req, res)
        calls = calls + 1
        local body, err = req:body()
        if not body then return res:status(400):send("my own: " .. err) end
        res:send("got " .. body)
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 2000" }))
      local data, how = read_all(s, 5)
      assert.equal("closed", how)
      assert.matches("^HTTP/1%.1 400 ", data)
      assert.matches("my own: body too large", data, 1, true)
      assert.matches("\r\nConnection: close\r\n", data, 1, true)
      srv:close()
    end)
  end)

  it("a failure after the handler answered changes nothing of the answer; the connection closes", function()
    run(function()
      local srv = serve({ timeouts = { body = 0.2 } }, function(req, res)
        calls = calls + 1
        res:send("early")
        seen[1] = { req:body() }
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 100" } .. "abc"))
      local data, how = read_all(s, 5)
      assert.equal("closed", how)
      assert.matches("^HTTP/1%.1 200 ", data)
      assert.equal(1, count_responses(data))
      assert.equal(408, seen[1][3])
      srv:close()
    end)
  end)

  it("a request with a good body on the same server is answered as usual, and kept alive", function()
    run(function()
      local srv = serve({ limits = { body = KiB } }, handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      for _ = 1, 2 do
        assert(s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 5" } .. "hello"))
        assert.equal("HTTP/1.1 200 OK", s:read("l", 5))
        local len
        repeat
          local h = assert(s:read("l", 5))
          len = len or h:match("^Content%-Length: (%d+)$")
        until h == ""
        assert.equal("got hello", s:read(tonumber(len), 5))
      end
      srv:close()
    end)
  end)
end)

---------------------------------------------------------------------------------------------
-- lingering close

describe("http server: lingering close", function()
  -- Writes `piece` over and over (from a task of its own) until a write fails; the task
  -- returns how many bytes went and the code of the failed write.
  local function flood(s, piece)
    return mw.spawn(function()
      local sent = 0
      while true do
        local ok, _, code = s:write(piece)
        if not ok then return sent, code end
        sent = sent + #piece
      end
    end)
  end

  it("a client sending 2 MiB to a 1 MiB limit before it reads gets the whole 413", function()
    run(function()
      local srv = serve({ limits = { body = MiB } }, handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      -- the whole request in one write, the way a naive client sends it, then the read:
      -- closing with 2 MiB unread would reset the connection and lose the answer
      local body = ("b"):rep(2 * MiB)
      s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: " .. #body } .. body)
      local data, how = read_all(s, 10)
      assert.equal("closed", how, "the answer was lost to a " .. tostring(how) .. "; got: " .. data)
      assert.matches("^HTTP/1%.1 413 ", data)
      local len = assert(tonumber(data:match("\r\nContent%-Length: (%d+)\r\n")))
      assert.equal(len, #data - assert(data:find("\r\n\r\n", 1, true)) - 3, "incomplete: " .. data)
      assert.matches("\r\nConnection: close\r\n", data, 1, true)
      s:close()
      assert.is_true(drained(srv))
      srv:close()
    end, 20)
  end)

  it("a client still sending after a bad head gets the whole 400", function()
    run(function()
      local srv = serve({}, handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local bad = head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 1x" }
      local writer = flood(s, bad .. ("z"):rep(64 * KiB - #bad))
      local data, how = read_all(s, 10)
      assert.equal("closed", how, "the answer was lost to a " .. tostring(how) .. "; got: " .. data)
      assert.matches("^HTTP/1%.1 400 ", data)
      assert.equal(0, calls)
      s:close()
      writer:join()
      assert.is_true(drained(srv))
      srv:close()
    end, 20)
  end)

  it("a flood of empty lines before a request: the error answer arrives whole", function()
    run(function()
      local srv = serve({}, handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local writer = mw.spawn(function()   -- 2 MiB of CRLF, as fast as the server takes it
        for _ = 1, 64 do
          if not s:write(("\r\n"):rep(16 * KiB)) then return end
        end
      end)
      local data, how = read_all(s, 10)
      assert.equal("closed", how, "the answer was lost to a " .. tostring(how) .. "; got: " .. data)
      -- (the status is the parser's verdict on the flood: 400, or 414 for an endless first line)
      assert.matches("^HTTP/1%.1 4%d%d ", data)
      local len = assert(tonumber(data:match("\r\nContent%-Length: (%d+)\r\n")))
      assert.equal(len, #data - assert(data:find("\r\n\r\n", 1, true)) - 3, "incomplete: " .. data)
      assert.equal(0, calls)
      s:close()
      writer:join()
      assert.is_true(drained(srv))
      srv:close()
    end, 20)
  end)

  it("a client that floods forever is cut off after timeouts.linger", function()
    run(function()
      local srv = serve({ limits = { body = KiB, linger = 1e12 }, timeouts = { linger = 0.5 } },
        handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local t0 = mw.now()
      assert(s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 1000000000" }))
      local writer = flood(s, ("f"):rep(64 * KiB))
      local data, how = read_all(s, 10)
      assert.equal("closed", how)
      assert.matches("^HTTP/1%.1 413 ", data)
      -- the server goes on reading (the flood's writes go through) until the bound, then
      -- closes: the flood's next writes fail
      assert.is_true(drained(srv, 5), "still lingering after 5 s")
      local elapsed = mw.now() - t0
      assert.is_true(elapsed >= 0.4 and elapsed < 2, "cut off after " .. elapsed .. " s")
      local ok, sent, code = writer:join(5)
      assert.is_true(ok)
      assert.is_true(sent > 2 * MiB, "only " .. sent .. " bytes went before the close")
      assert.is_string(code)
      srv:close()
    end, 20)
  end)

  it("a client that floods forever is cut off after limits.linger bytes", function()
    run(function()
      local srv = serve({ limits = { body = KiB, linger = 256 * KiB }, timeouts = { linger = 30 } },
        handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local t0 = mw.now()
      assert(s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 1000000000" }))
      local writer = flood(s, ("f"):rep(64 * KiB))
      local data, how = read_all(s, 10)
      assert.equal("closed", how)
      assert.matches("^HTTP/1%.1 413 ", data)
      assert.is_true(drained(srv, 5), "still lingering after 5 s")
      assert.is_true(mw.now() - t0 < 5)
      local ok, _, code = writer:join(5)
      assert.is_true(ok)
      assert.is_string(code)
      srv:close()
    end, 20)
  end)

  it("a lingering connection is counted, and srv:close() ends it at once", function()
    run(function()
      local srv = serve({ limits = { body = KiB, linger = 1e12 }, timeouts = { linger = 30 } },
        handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 1000000000" }))
      local writer = flood(s, ("f"):rep(64 * KiB))
      local data, how = read_all(s, 10)
      assert.equal("closed", how)
      assert.matches("^HTTP/1%.1 413 ", data)
      mw.sleep(0.2)
      assert.equal(1, srv:connections())      -- still reading the flood
      local t0 = mw.now()
      assert.is_true(srv:close(10))
      assert.is_true(mw.now() - t0 < 1, ("close took %.2f s"):format(mw.now() - t0))
      assert.equal(0, srv:connections())
      assert.is_true((writer:join(5)))
    end, 20)
  end)

  it("a request answered without error does not linger: Connection: close closes at once", function()
    run(function()
      local srv = serve({ timeouts = { linger = 30 } }, handlers.returns)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "POST /up HTTP/1.1", "Host: x", "Content-Length: 5", "Connection: close" } .. "hello"))
      local data, how = read_all(s, 5)
      assert.equal("closed", how)
      assert.matches("^HTTP/1%.1 200 ", data)
      assert.is_true(drained(srv, 1))   -- the client keeps its socket open: no lingering
      srv:close()
    end)
  end)
end)
