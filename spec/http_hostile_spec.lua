-- HTTP/1.1 server under hostile input (docs/http.md "Protocol rules", DESIGN.md "Protocol rules
-- the core enforces"): exact bytes over raw sockets. Limits (414/431), versions (505), Host
-- rules, Content-Length / Transfer-Encoding framing and smuggling, chunk syntax, header syntax
-- (obs-fold, NUL, bare CR/LF), absolute-form targets, clients that vanish, and the head /
-- idle / body timeouts (totals, so trickling clients are still cut off).
-- Every rejected request must get one answer, then the connection closes, and the handler
-- never sees it (nor anything pipelined after it).

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local KiB = 1024

---------------------------------------------------------------------------------------------
-- fixtures

local calls, seen, errors = 0, {}, {}

local function record(req, res)
  calls = calls + 1
  seen[#seen + 1] = req
  res:header("content-type", "text/plain")
  res:send("handled " .. req.method .. " " .. req.path)
end

-- Starts a server (default handler: `record`); resets the call records.
local function serve(opts, handler)
  opts = opts or {}
  calls, seen, errors = 0, {}, {}
  opts.host, opts.port, opts.handler = "127.0.0.1", 0, handler or record
  opts.error_log = function(msg) errors[#errors + 1] = msg end
  return assert(http.server(opts))
end

local function guard(srv)
  return setmetatable({}, { __close = function() pcall(srv.close, srv, 0) end })
end

local function connect(srv)
  return assert(mw.tcp.connect("127.0.0.1", srv.port, { timeout = 5 }))
end

-- Reads until the peer closes (a reset counts as closed). Returns the bytes and "closed", or
-- the bytes so far and "timeout".
local function read_all(s, timeout)
  local parts = {}
  local deadline = mw.now() + (timeout or 5)
  while true do
    local left = deadline - mw.now()
    if left <= 0 then return table.concat(parts), "timeout" end
    local piece, _, code = s:recv(65536, left)
    if not piece then
      if code == "timeout" then return table.concat(parts), "timeout" end
      return table.concat(parts), "closed"
    end
    parts[#parts + 1] = piece
  end
end

-- Writes `bytes` on a fresh connection (from a task of its own: the server may close before
-- it has read them all) and reads until the server closes.
local function exchange(srv, bytes, timeout)
  local s <close> = connect(srv)
  local writer = mw.spawn(function() s:write(bytes) end)
  local data, how = read_all(s, timeout)
  writer:cancel()
  writer:join()
  return data, how
end

local function count_responses(data)
  local n = 0
  for _ in data:gmatch("HTTP/1%.1 %d%d%d ") do n = n + 1 end
  return n
end

-- The request is answered with `status` (exactly one response), the connection closes, and the
-- handler never runs.
local function rejects(srv, bytes, status)
  local data, how = exchange(srv, bytes)
  assert.equal("closed", how, "connection left open; got: " .. data)
  assert.matches("^HTTP/1%.1 " .. status .. " ", data, nil, "expected " .. status .. ", got: " .. data)
  assert.equal(1, count_responses(data), "exactly one response expected, got: " .. data)
  assert.matches("\r\nConnection: close\r\n", data, 1, true)
  assert.equal(0, calls, "the handler ran for " .. ((seen[1] or {}).target or "?"))
  return data
end

-- The request is accepted: one 200 from the handler.
local function accepts(srv, bytes)
  local s <close> = connect(srv)
  assert(s:write(bytes))
  local line = assert(s:read("l", 5))
  assert.equal("HTTP/1.1 200 OK", line)
  assert.equal(1, calls)
  return seen[1]
end

-- Reads one Content-Length-framed response: status line, body.
local function response(s)
  local line = assert(s:read("l", 5))
  local len
  repeat
    local h = assert(s:read("l", 5))
    len = len or h:match("^[Cc]ontent%-[Ll]ength: (%d+)$")
  until h == ""
  len = assert(math.tointeger(tonumber(len)), "no Content-Length")
  return line, len > 0 and assert(s:read(len, 5)) or ""
end

local function head(lines)
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

local SMUGGLED = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

---------------------------------------------------------------------------------------------

describe("http hostile: size limits", function()
  it("request line above 8 KiB -> 414", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      rejects(srv, head { "GET /" .. ("a"):rep(9000) .. " HTTP/1.1", "Host: x" }, 414)
      srv:close()
    end)
  end)

  it("a request line just under 8 KiB is accepted", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local target = "/" .. ("a"):rep(8100)
      local req = accepts(srv, head { "GET " .. target .. " HTTP/1.1", "Host: x" })
      assert.equal(target, req.path)
      srv:close()
    end)
  end)

  it("an unterminated request line above the limit -> 414 without waiting for its end", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      rejects(srv, "GET /" .. ("a"):rep(9000), 414)
      srv:close()
    end, 5)
  end)

  it("limits.request_line is configurable", function()
    run(function()
      local srv = serve { limits = { request_line = 100 } }
      local _g <close> = guard(srv)
      rejects(srv, head { "GET /" .. ("a"):rep(150) .. " HTTP/1.1", "Host: x" }, 414)
      srv:close()
    end)
  end)

  it("request head above 16 KiB -> 431", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local lines = { "GET / HTTP/1.1", "Host: x" }
      for i = 1, 20 do lines[#lines + 1] = ("X-H%d: %s"):format(i, ("v"):rep(1000)) end
      rejects(srv, head(lines), 431)
      srv:close()
    end)
  end)

  it("an unterminated head above the limit -> 431 without waiting for its end", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local lines = { "GET / HTTP/1.1", "Host: x" }
      for i = 1, 20 do lines[#lines + 1] = ("X-H%d: %s"):format(i, ("v"):rep(1000)) end
      rejects(srv, table.concat(lines, "\r\n") .. "\r\n", 431)
      srv:close()
    end, 5)
  end)

  it("limits.head is configurable", function()
    run(function()
      local srv = serve { limits = { head = 2048 } }
      local _g <close> = guard(srv)
      rejects(srv, head { "GET / HTTP/1.1", "Host: x", "X-Big: " .. ("v"):rep(3000) }, 431)
      srv:close()
    end)
  end)

  it("more than 100 header fields -> 431; exactly 100 are accepted", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local lines = { "GET / HTTP/1.1", "Host: x" }
      for i = 1, 99 do lines[#lines + 1] = "X-N" .. i .. ": v" end
      local req = accepts(srv, head(lines))   -- Host + 99 = 100 fields
      assert.equal("v", req.headers["x-n99"])
      calls = 0
      lines[#lines + 1] = "X-N100: v"         -- 101 fields
      rejects(srv, head(lines), 431)
      srv:close()
    end)
  end)

  it("limits.headers is configurable", function()
    run(function()
      local srv = serve { limits = { headers = 5 } }
      local _g <close> = guard(srv)
      rejects(srv, head { "GET / HTTP/1.1", "Host: x", "A: 1", "B: 2", "C: 3", "D: 4", "E: 5" }, 431)
      srv:close()
    end)
  end)
end)

describe("http hostile: versions", function()
  for _, v in ipairs { "2.0", "1.2", "3.0", "0.9", "1.9" } do
    it("HTTP/" .. v .. " -> 505 (never answered as if it were 1.1)", function()
      run(function()
        local srv = serve()
        local _g <close> = guard(srv)
        rejects(srv, head { "GET / HTTP/" .. v, "Host: x" }, 505)
        srv:close()
      end)
    end)
  end

  it("with http2 = false, the HTTP/2 connection preface is refused (400 or 505) and never handled", function()
    run(function()
      local srv = serve { http2 = false }
      local _g <close> = guard(srv)
      local data, how = exchange(srv, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
      assert.equal("closed", how)
      local status = data:match("^HTTP/1%.1 (%d%d%d) ")
      assert.is_true(status == "505" or status == "400", "got: " .. data)
      assert.equal(0, calls)
      srv:close()
    end)
  end)
end)

describe("http hostile: Host", function()
  local bad = {
    { "missing in HTTP/1.1", { "GET / HTTP/1.1", "X-A: b" } },
    { "repeated (same value)", { "GET / HTTP/1.1", "Host: x", "Host: x" } },
    { "repeated (different values)", { "GET / HTTP/1.1", "Host: a.example", "Host: b.example" } },
    { "with a space", { "GET / HTTP/1.1", "Host: a b" } },
    { "with a slash", { "GET / HTTP/1.1", "Host: a/b" } },
    { "with userinfo", { "GET / HTTP/1.1", "Host: user@a.example" } },
    { "with a bad port", { "GET / HTTP/1.1", "Host: a.example:http" } },
    { "with two ports", { "GET / HTTP/1.1", "Host: a.example:80:90" } },
    { "with an unclosed IPv6 literal", { "GET / HTTP/1.1", "Host: [::1" } },
    { "with a bad IPv6 literal", { "GET / HTTP/1.1", "Host: [::g]" } },
  }
  for _, case in ipairs(bad) do
    it(case[1] .. " -> 400", function()
      run(function()
        local srv = serve()
        local _g <close> = guard(srv)
        rejects(srv, head(case[2]), 400)
        srv:close()
      end)
    end)
  end

  it("valid forms are accepted; HTTP/1.0 needs no Host", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      for _, host in ipairs { "example.com", "example.com:8080", "127.0.0.1:80", "[::1]:8080", "[::1]",
                              "xn--bcher-kva.example", "a-b.c_d" } do
        calls, seen = 0, {}
        local req = accepts(srv, head { "GET / HTTP/1.1", "Host: " .. host })
        assert.equal(host, req.headers.host)
      end
      calls, seen = 0, {}
      local req = accepts(srv, head { "GET / HTTP/1.0" })
      assert.equal("1.0", req.version)
      srv:close()
    end)
  end)
end)

describe("http hostile: message framing", function()
  local cases = {
    { "Content-Length with Transfer-Encoding", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 5", "Transfer-Encoding: chunked" },
      "0\r\n\r\n" },
    { "Transfer-Encoding with Content-Length", 400,
      { "POST / HTTP/1.1", "Host: x", "Transfer-Encoding: chunked", "Content-Length: 5" },
      "0\r\n\r\n" },
    { "duplicate differing Content-Length", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 5", "Content-Length: 6" }, "hello!" },
    { "duplicate identical Content-Length", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 5", "Content-Length: 5" }, "hello" },
    { "list-valued Content-Length", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 5, 5" }, "hello" },
    { "list-valued differing Content-Length", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 5, 6" }, "hello!" },
    { "Content-Length: +5", 400, { "POST / HTTP/1.1", "Host: x", "Content-Length: +5" }, "hello" },
    { "Content-Length: -5", 400, { "POST / HTTP/1.1", "Host: x", "Content-Length: -5" }, "hello" },
    { "Content-Length with a space inside", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 5 5" }, "hello" },
    { "empty Content-Length", 400, { "POST / HTTP/1.1", "Host: x", "Content-Length:" }, "hello" },
    { "hex Content-Length", 400, { "POST / HTTP/1.1", "Host: x", "Content-Length: 0x5" }, "hello" },
    { "Content-Length with a trailing letter", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 5a" }, "hello" },
    { "overflowing Content-Length", 400,
      { "POST / HTTP/1.1", "Host: x", "Content-Length: 184467440737095516160" }, "hello" },
    { "Transfer-Encoding: gzip, chunked", 501,
      { "POST / HTTP/1.1", "Host: x", "Transfer-Encoding: gzip, chunked" }, "0\r\n\r\n" },
    { "Transfer-Encoding: chunked, gzip", 400,
      { "POST / HTTP/1.1", "Host: x", "Transfer-Encoding: chunked, gzip" }, "0\r\n\r\n" },
    { "Transfer-Encoding: identity", 400,
      { "POST / HTTP/1.1", "Host: x", "Transfer-Encoding: identity" }, "0\r\n\r\n" },
    { "Transfer-Encoding: gzip", 400,
      { "POST / HTTP/1.1", "Host: x", "Transfer-Encoding: gzip" }, "0\r\n\r\n" },
    { "Transfer-Encoding: xchunked", 400,
      { "POST / HTTP/1.1", "Host: x", "Transfer-Encoding: xchunked" }, "0\r\n\r\n" },
  }
  for _, case in ipairs(cases) do
    it(case[1] .. " -> " .. case[2] .. ", close; the request smuggled after it is never answered", function()
      run(function()
        local srv = serve()
        local _g <close> = guard(srv)
        rejects(srv, head(case[3]) .. case[4] .. SMUGGLED, case[2])
        srv:close()
      end)
    end)
  end

  it("chunk extensions and trailer fields are accepted; the next request follows", function()
    run(function()
      local srv = serve(nil, function(req, res)
        calls = calls + 1
        local body = assert(req:body())
        res:header("content-type", "text/plain")
        res:send(req.path .. " " .. body)
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "POST /ext HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" }
        .. "5;name=value\r\nhello\r\n6;flag\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        .. "POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"))
      assert.same({ "HTTP/1.1 200 OK", "/ext hello world" }, { response(s) })
      assert.same({ "HTTP/1.1 200 OK", "/next ok" }, { response(s) })
      srv:close()
    end)
  end)

  -- RFC 9110 §5.6.3: OWS is spaces and horizontal tabs; RFC 9112 §7.1.1: a chunk extension's
  -- value is a token or a quoted-string
  it("tabs as optional white space around field values and Transfer-Encoding: chunked are accepted", function()
    run(function()
      local got = {}
      local srv = serve(nil, function(req, res)
        calls = calls + 1
        got[#got + 1] = { req.headers["x-a"], assert(req:body()) }
        res:send(req.path)
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      for i, te in ipairs { "Transfer-Encoding:\tchunked\t", "Transfer-Encoding: \tchunked \t",
                            "Transfer-Encoding:chunked\t", "Transfer-Encoding:\tchunked" } do
        assert(s:write(head { "POST /te" .. i .. " HTTP/1.1", "Host: x", "X-A:\t v \t", te }
          .. "5\r\nhello\r\n0\r\n\r\n"))
        assert.same({ "HTTP/1.1 200 OK", "/te" .. i }, { response(s) })
        assert.same({ "v", "hello" }, got[i])
      end
      srv:close()
    end)
  end)

  it("a tab around a Content-Length value is optional white space (whole or byte by byte); inside it, a 400", function()
    run(function()
      local srv = serve(nil, function(req, res)
        calls = calls + 1
        res:send(req.path .. " " .. assert(req:body()))
      end)
      local _g <close> = guard(srv)
      for i, cl in ipairs { "Content-Length:\t5\t", "Content-Length: 5\t", "content-length:\t 5 \t" } do
        local s <close> = connect(srv)
        assert(s:write(head { "POST /cl" .. i .. " HTTP/1.1", "Host: x", cl } .. "hello"))
        assert.same({ "HTTP/1.1 200 OK", "/cl" .. i .. " hello" }, { response(s) })
        -- the same head one byte per write (the tab and the line's start in different reads)
        local s2 <close> = connect(srv)
        local bytes = head { "POST /b" .. i .. " HTTP/1.1", "Host: x", cl } .. "hello"
        for k = 1, #bytes do assert(s2:write(bytes:sub(k, k))) mw.sleep(0) end
        assert.same({ "HTTP/1.1 200 OK", "/b" .. i .. " hello" }, { response(s2) })
      end
      calls = 0
      rejects(srv, head { "POST / HTTP/1.1", "Host: x", "Content-Length: 1\t0" } .. "0123456789", 400)
      srv:close()
    end)
  end)

  it("chunk extensions with token and quoted-string values are accepted", function()
    run(function()
      local srv = serve(nil, function(req, res)
        calls = calls + 1
        res:send(req.path .. " " .. assert(req:body()))
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      for i, ext in ipairs { ';name="value"', ";name=token", ';a="b c";d=e', ';a=""', ';a="b\tc"', ";flag",
                             ";a;b", ";a=b" } do
        assert(s:write(head { "POST /ext" .. i .. " HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" }
          .. "5" .. ext .. "\r\nhello\r\n0" .. ext .. "\r\n\r\n"))
        assert.same({ "HTTP/1.1 200 OK", "/ext" .. i .. " hello" }, { response(s) }, ext)
      end
      srv:close()
    end)
  end)

  it("a request delivered one byte per segment is parsed exactly", function()
    run(function()
      local got
      local srv = serve(nil, function(req, res)
        calls = calls + 1
        got = { path = req.path, query = req.query_string, a = req.headers["x-a"],
                list = req:header_list("x-b"), body = req:body() }
        res:send("ok")
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local bytes = head { "POST /one%20byte?q=1 HTTP/1.1", "Host: x", "X-A:  spaced value ", "X-B: 1",
        "X-B: 2", "Transfer-Encoding: chunked" } .. "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
      for i = 1, #bytes do
        assert(s:write(bytes:sub(i, i)))
        mw.sleep(0.001)
      end
      assert.same({ "HTTP/1.1 200 OK", "ok" }, { response(s) })
      assert.same({ path = "/one byte", query = "q=1", a = "spaced value", list = { "1", "2" }, body = "abcde" },
        got)
      srv:close()
    end)
  end)

  it("optional white space around a Content-Length value is not part of it (accepted)", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "POST /ows HTTP/1.1", "Host: x", "Content-Length:   5  " } .. "hello"
        .. "GET /next HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "handled POST /ows" }, { response(s) })
      assert.same({ "HTTP/1.1 200 OK", "handled GET /next" }, { response(s) })
      srv:close()
    end)
  end)

  -- Handlers that read the body see the framing error with its status; the connection closes.
  local function body_handler(req, res)
    calls = calls + 1
    local body, err, code = req:body()
    seen[#seen + 1] = { body = body, err = err, code = code, path = req.path }
    if not body then
      res:status(code or 500)
      return res:send(tostring(err))
    end
    res:send("body " .. body)
  end

  local chunk_cases = {
    { "a chunk size that is not hex (zz)", "zz\r\nhello\r\n0\r\n\r\n" },
    { "an overflowing chunk size", "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n" },
    { "a negative chunk size", "-5\r\nhello\r\n0\r\n\r\n" },
    { "a chunk without its CRLF", "5\r\nhelloXX0\r\n\r\n" },
    { "a chunk size with a space inside", "5 0\r\nhello\r\n0\r\n\r\n" },
    -- the head's line rules (CRLF only, no folding, no empty name) hold for the chunk lines
    -- and the trailer section too: a bare LF there could end the message early for a proxy
    -- in front that reads it differently (request smuggling)
    { "a bare LF ending a chunk-size line", "5\nhello\r\n0\r\n\r\n" },
    { "a bare LF ending chunk data", "5\r\nhello\n0\r\n\r\n" },
    { "a bare LF ending the last chunk", "5\r\nhello\r\n0\n\r\n" },
    { "a CR not followed by LF after a chunk size", "5\rhello\r\n0\r\n\r\n" },
    { "a bare LF ending a chunk extension", "5;a=b\nhello\r\n0\r\n\r\n" },
    { "a space before a chunk extension", "5 ;a=b\r\nhello\r\n0\r\n\r\n" },
    { "a tab after a chunk size", "5\t\r\nhello\r\n0\r\n\r\n" },
    { "a chunk extension with an empty name", "5;=b\r\nhello\r\n0\r\n\r\n" },
    { "a chunk extension with an empty value", "5;a=\r\nhello\r\n0\r\n\r\n" },
    { "a bare LF ending the trailer section (no trailers)", "5\r\nhello\r\n0\r\n\n" },
    { "a bare LF ending the trailer section after a field", "0\r\nX-T: y\r\n\n" },
    { "a bare LF ending a trailer field", "0\r\nX-T: y\n\r\n" },
    { "a folded trailer line (space)", "0\r\nX-T: y\r\n z\r\n\r\n" },
    { "a folded trailer line (tab)", "0\r\nX-T: y\r\n\tz\r\n\r\n" },
    { "a trailer with an empty name", "0\r\n: y\r\n\r\n" },
    { "a CR not followed by LF ending the trailer section", "0\r\n\r\r" },
    -- extensions are dropped unread, so they count against no body limit: 4 KiB a chunk
    { "one chunk extension over 4 KiB", "5;a=" .. ("x"):rep(5000) .. "\r\nhello\r\n0\r\n\r\n" },
    { "a chunk's extensions over 4 KiB together",
      "5" .. (';a="' .. ("x"):rep(95) .. '"'):rep(50) .. "\r\nhello\r\n0\r\n\r\n" },
  }
  for _, case in ipairs(chunk_cases) do
    it(case[1] .. " -> 400 to the reading handler, close, the smuggled request never answered", function()
      run(function()
        local srv = serve(nil, body_handler)
        local _g <close> = guard(srv)
        local data, how = exchange(srv, head { "POST /upload HTTP/1.1", "Host: x",
          "Transfer-Encoding: chunked" } .. case[2] .. SMUGGLED)
        assert.equal("closed", how)
        assert.equal(1, calls)
        assert.is_nil(seen[1].body)
        assert.equal(400, seen[1].code)
        assert.matches("^HTTP/1%.1 400 ", data)
        assert.equal(1, count_responses(data))
        srv:close()
      end)
    end)
  end

  it("chunk extensions up to 4 KiB a chunk are accepted, on every chunk", function()
    run(function()
      local srv = serve(nil, body_handler)
      local _g <close> = guard(srv)
      local ext = ";a=" .. ("x"):rep(4000)
      local data = exchange(srv, head { "POST /upload HTTP/1.1", "Host: x", "Transfer-Encoding: chunked",
        "Connection: close" } .. "5" .. ext .. "\r\nhello\r\n1" .. ext .. "\r\n!\r\n0" .. ext .. "\r\n\r\n")
      assert.matches("^HTTP/1%.1 200 ", data)
      assert.equal("hello!", seen[1].body)
      srv:close()
    end)
  end)

  -- what follows a CONNECT's head is a tunnel's bytes: a CONNECT the handler answered
  -- without taking the connection over ends it, nothing after it is served as a request
  it("a CONNECT the handler answers ends the connection; bytes after it are no request", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local data, how = exchange(srv, head { "CONNECT example.com:443 HTTP/1.1", "Host: example.com:443" }
        .. SMUGGLED)
      assert.equal("closed", how)
      assert.equal(1, count_responses(data))
      assert.same({ "CONNECT" }, { seen[1].method })
      srv:close()
    end)
  end)

  -- RFC 9110 §9.3.6: a 2xx to CONNECT has neither Content-Length nor Transfer-Encoding, and
  -- no body: the client takes the bytes after its head for the tunnel's. (It went out with
  -- the handler's body and its length, or chunked.) Every way a handler answers, through
  -- res:send's C path (gzip off) and its Lua one (gzip from 0 bytes); a non-2xx keeps its body.
  local this_file = debug.getinfo(1, "S").source:match("^@(.*)$")
  for _, case in ipairs {
    { "res:send", function(_, res) res:send("tunnel-body") end },
    { "status 201, res:send", function(_, res) res:status(201):send("tunnel-body") end },
    { "res:write, res:finish", function(_, res)
      assert(res:write("tunnel-"))
      assert(res:write("body"))
      assert(res:finish())
    end },
    { "a content-length of the handler's", function(_, res)
      res:header("content-length", "11")
      res:send("tunnel-body")
    end },
    { "a header set, nothing sent", function(_, res) res:header("x-tunnel", "yes") end },
    { "res:sendfile", function(_, res) assert(res:sendfile(this_file)) end },
  } do
    for _, path in ipairs { "C", "Lua" } do
      it("a 2xx to CONNECT has no length and no body (" .. case[1] .. ", " .. path .. " path)", function()
        run(function()
          local ran = false
          local srv = serve({ gzip = path == "Lua", gzip_min = 0 }, function(req, res)
            ran = true
            assert.equal("CONNECT", req.method)
            case[2](req, res)
          end)
          local _g <close> = guard(srv)
          local data, how = exchange(srv, head { "CONNECT example.com:443 HTTP/1.1", "Host: example.com:443" })
          assert.is_true(ran)
          assert.equal("closed", how)
          assert.matches("^HTTP/1%.1 20[01] ", data)
          local h, rest = data:match("^(.-\r\n\r\n)(.*)$")
          assert.equal("", rest, "bytes after the head: " .. data)
          assert.is_nil(h:lower():find("\r\ncontent%-length:"), data)
          assert.is_nil(h:lower():find("\r\ntransfer%-encoding:"), data)
          assert.matches("\r\nConnection: close\r\n", h, 1, true)
          if case[1] == "a header set, nothing sent" then assert.matches("\r\nx%-tunnel: yes\r\n", h) end
          srv:close()
        end)
      end)
    end
  end

  it("a CONNECT answered 403 keeps its body and length", function()
    run(function()
      local srv = serve({}, function(_, res) res:status(403):send("no tunnels") end)
      local _g <close> = guard(srv)
      local data, how = exchange(srv, head { "CONNECT example.com:443 HTTP/1.1", "Host: example.com:443" })
      assert.equal("closed", how)
      assert.matches("^HTTP/1%.1 403 .-\r\nContent%-Length: 10\r\n.-\r\n\r\nno tunnels$", data)
      srv:close()
    end)
  end)

  it("a bad chunk the handler never reads: the connection closes after the answer", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local data, how = exchange(srv, head { "POST /ignore HTTP/1.1", "Host: x",
        "Transfer-Encoding: chunked" } .. "zz\r\nhello\r\n0\r\n\r\n" .. SMUGGLED)
      assert.equal("closed", how)
      assert.equal(1, count_responses(data))
      assert.same({ "/ignore" }, { seen[1].path })
      srv:close()
    end)
  end)

  it("a bare LF ending the trailer section the handler never reads: closed after one answer", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local data, how = exchange(srv, head { "POST /ignore HTTP/1.1", "Host: x",
        "Transfer-Encoding: chunked" } .. "5\r\nhello\r\n0\r\n\n" .. SMUGGLED)
      assert.equal("closed", how)
      assert.equal(1, count_responses(data), data)
      assert.same({ "/ignore" }, { seen[1].path })
      srv:close()
    end)
  end)

  it("the trailer rules hold when the trailer section arrives one byte per segment", function()
    run(function()
      local srv = serve(nil, body_handler)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "POST /slow HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" } .. "5\r\nhello\r\n0"))
      local rest = "\r\nX-T: y\r\n\n" .. SMUGGLED
      for i = 1, #rest do
        if not s:write(rest:sub(i, i)) then break end  -- (the server may have closed already)
        mw.sleep(0.001)
      end
      local data, how = read_all(s)
      assert.equal("closed", how)
      assert.equal(1, count_responses(data), data)
      assert.equal(400, seen[1].code)
      srv:close()
    end)
  end)

  it("good trailers delivered one byte per segment are read; the next request follows", function()
    run(function()
      local got
      local srv = serve(nil, function(req, res)
        calls = calls + 1
        local body = assert(req:body())
        if req.path == "/a" then got = { body = body, t = req.trailers and req.trailers["x-t"] } end
        res:send(req.path)
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local bytes = head { "POST /a HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" }
        .. "5\r\nhello\r\n0\r\nX-T: y\r\nX-U:\tz\r\n\r\n" .. "GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
      for i = 1, #bytes do
        assert(s:write(bytes:sub(i, i)))
        mw.sleep(0.001)
      end
      assert.same({ "HTTP/1.1 200 OK", "/a" }, { response(s) })
      assert.same({ "HTTP/1.1 200 OK", "/b" }, { response(s) })
      assert.same({ body = "hello", t = "y" }, got)
      srv:close()
    end)
  end)

  it("a chunked body with a smuggled request inside its data is just data", function()
    run(function()
      local srv = serve(nil, body_handler)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local inner = SMUGGLED
      assert(s:write(head { "POST /a HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" }
        .. ("%x\r\n%s\r\n0\r\n\r\n"):format(#inner, inner)))
      local data = assert(s:read("l", 5))
      assert.equal("HTTP/1.1 200 OK", data)
      assert.equal(1, calls)
      assert.equal(inner, seen[1].body)
      srv:close()
    end)
  end)
end)

describe("http hostile: header and request-line syntax", function()
  local cases = {
    { "obs-fold (a line starting with a space)", { "GET / HTTP/1.1", "Host: x", "X-A: a", " folded" } },
    { "obs-fold (a line starting with a tab)", { "GET / HTTP/1.1", "Host: x", "X-A: a", "\tfolded" } },
    { "NUL in a header value", { "GET / HTTP/1.1", "Host: x", "X-A: a\0b" } },
    { "NUL in a header name", { "GET / HTTP/1.1", "Host: x", "X\0A: b" } },
    { "bare CR in a header value", { "GET / HTTP/1.1", "Host: x", "X-A: a\rb" } },
    { "bare CR in a header name", { "GET / HTTP/1.1", "Host: x", "X\rA: b" } },
    { "LF inside a header name", { "GET / HTTP/1.1", "Host: x", "X-\nA: b" } },
    { "LF inside a header value", { "GET / HTTP/1.1", "Host: x", "X-A: a\nb" } },
    { "a space inside a header name", { "GET / HTTP/1.1", "Host: x", "X A: b" } },
    { "a space before the colon", { "GET / HTTP/1.1", "Host: x", "X-A : b" } },
    { "an empty header name", { "GET / HTTP/1.1", "Host: x", ": b" } },
    { "a header line without a colon", { "GET / HTTP/1.1", "Host: x", "X-A b" } },
    { "a control character in a value", { "GET / HTTP/1.1", "Host: x", "X-A: a\1b" } },
    { "an unknown method", { "FROB / HTTP/1.1", "Host: x" } },
    { "a lower-case method", { "get / HTTP/1.1", "Host: x" } },
    { "a space inside the target", { "GET /a b HTTP/1.1", "Host: x" } },
    { "a control character in the target", { "GET /a\1b HTTP/1.1", "Host: x" } },
    { "a lower-case protocol name", { "GET / http/1.1", "Host: x" } },
    -- a bare CR in the request line is malformed (400), whatever version precedes it (not 505)
    { "a bare CR after the version", { "GET / HTTP/1.1\rX", "Host: x" } },
    { "a bare CR ending the request line", { "GET / HTTP/1.1\r", "Host: x" } },
    { "a bare CR after an unsupported version", { "GET / HTTP/2.0\rX", "Host: x" } },
    { "a bare CR inside the target", { "GET /a\rb HTTP/1.1", "Host: x" } },
  }
  for _, case in ipairs(cases) do
    it(case[1] .. " -> 400 and close", function()
      run(function()
        local srv = serve()
        local _g <close> = guard(srv)
        rejects(srv, head(case[2]) .. SMUGGLED, 400)
        srv:close()
      end)
    end)
  end

  for _, case in ipairs {
    { "everywhere", "GET / HTTP/1.1\nHost: x\n\n" },
    { "ending a header line", "GET / HTTP/1.1\r\nHost: x\n\r\n" },
    { "ending the head (the empty line)", "GET / HTTP/1.1\r\nHost: x\r\n\n" },
  } do
    it("bare LF line endings (" .. case[1] .. ") -> 400 (strict mode)", function()
      run(function()
        local srv = serve()
        local _g <close> = guard(srv)
        rejects(srv, case[2] .. SMUGGLED, 400)
        srv:close()
      end)
    end)
  end

  it("a header value reaching the handler never holds CR or LF (obs-fold refused or unfolded)", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local data = exchange(srv, head { "GET / HTTP/1.1", "Host: x", "X-A: first", " folded", "X-B: b" })
      if calls == 0 then
        assert.matches("^HTTP/1%.1 400 ", data)
      else
        local v = seen[1].headers["x-a"]
        assert.is_nil(v:find("[\r\n]"), ("x-a reached the handler as %q"):format(v))
        assert.equal("first folded", v:gsub("%s+", " "))
        assert.equal("b", seen[1].headers["x-b"])
      end
      srv:close()
    end)
  end)

  it("an HTTP/0.9-style request line (no version) is refused and never handled", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local data, how = exchange(srv, "GET /\r\n\r\n")
      assert.equal("closed", how)
      assert.equal(0, calls)
      if data ~= "" then
        local status = data:match("^HTTP/1%.1 (%d%d%d) ")
        assert.is_true(status == "505" or status == "400", "got: " .. data)
      end
      srv:close()
    end)
  end)

  -- RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line
  -- (old clients send a CRLF after a POST body); a bounded number (8) is skipped
  it("empty lines (CRLF) before the request line are skipped, up to 8; the request is answered", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      for _, n in ipairs { 1, 2, 8 } do
        local s <close> = connect(srv)
        assert(s:write(("\r\n"):rep(n) .. "GET /blank" .. n .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert.same({ "HTTP/1.1 200 OK", "handled GET /blank" .. n }, { response(s) })
      end
      -- a CRLF split across segments, before a request on a kept-alive connection
      local s <close> = connect(srv)
      assert(s:write("GET /first HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "handled GET /first" }, { response(s) })
      assert(s:write("\r"))
      mw.sleep(0.02)
      assert(s:write("\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "handled GET /second" }, { response(s) })
      srv:close()
    end)
  end)

  it("a POST body followed by a stray CRLF, then a pipelined request: both are answered", function()
    run(function()
      local srv = serve(nil, function(req, res)
        calls = calls + 1
        res:send(req.path .. " " .. assert(req:body()))
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write("POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=1\r\n"
        .. "GET /next HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "/form a=1" }, { response(s) })
      assert.same({ "HTTP/1.1 200 OK", "/next " }, { response(s) })
      srv:close()
    end)
  end)

  it("more than 8 empty lines, or a bare LF, before the request line -> 400 and close", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      rejects(srv, ("\r\n"):rep(9) .. "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400)
      rejects(srv, "\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400)
      rejects(srv, "\r\n\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400)
      srv:close()
    end)
  end)

  it("a good request pipelined after a bad one is never answered", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      rejects(srv, "GET / HTTP/1.1\r\nHost: a b\r\n\r\n" .. "GET /good HTTP/1.1\r\nHost: x\r\n\r\n", 400)
      srv:close()
    end)
  end)

  it("a good request then a bad one: the first is answered, the second gets 400 and the close", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local data, how = exchange(srv, "GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        .. "GET /second HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n" .. SMUGGLED)
      assert.equal("closed", how)
      assert.equal(2, count_responses(data))
      assert.matches("^HTTP/1%.1 200 .-handled GET /first.-HTTP/1%.1 400 ", data)
      assert.equal(1, calls)
      srv:close()
    end)
  end)

  it("absolute-form targets: path and query come from the URL", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      for _, target in ipairs { "http://example/x?y=1", "http://example:8080/a%20b", "http://example",
                                "http://example?q=1" } do
        assert(s:write(head { "GET " .. target .. " HTTP/1.1", "Host: example" }))
        assert.equal("HTTP/1.1 200 OK", (response(s)))
      end
      assert.equal(4, #seen)
      assert.same({ "http://example/x?y=1", "/x", "y=1", { y = "1" } },
        { seen[1].target, seen[1].path, seen[1].query_string, seen[1]:query() })
      assert.same({ "/a b", "" }, { seen[2].path, seen[2].query_string })
      assert.same({ "/", "" }, { seen[3].path, seen[3].query_string })
      assert.same({ "/", "q=1" }, { seen[4].path, seen[4].query_string })
      srv:close()
    end)
  end)
end)

describe("http hostile: absolute-form targets and Host", function()
  -- RFC 9112 §3.2.2: the target's authority wins over a conflicting Host, which must still be
  -- present and valid
  it("the authority of an absolute-form target replaces a conflicting Host", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      for _, case in ipairs {
        { "http://a.example/x", "b.example" },
        { "http://a.example:8080?q=1", "b.example:8080" },
        { "http://a.example", "a.example" },
      } do
        assert(s:write(head { "GET " .. case[1] .. " HTTP/1.1", "Host: " .. case[2] }))
        assert.equal("HTTP/1.1 200 OK", (response(s)))
      end
      assert.same({ "a.example", "/x" }, { seen[1].headers.host, seen[1].path })
      assert.same({ "a.example:8080", "/", "q=1" }, { seen[2].headers.host, seen[2].path, seen[2].query_string })
      assert.equal("a.example", seen[3].headers["Host"])
      srv:close()
    end)
  end)

  for _, case in ipairs {
    { "an empty authority", "GET http:///x HTTP/1.1" },
    { "userinfo in the authority", "GET http://user@a.example/x HTTP/1.1" },
    { "a bad port", "GET http://a.example:8x/x HTTP/1.1" },
  } do
    it("an absolute-form target with " .. case[1] .. " -> 400", function()
      run(function()
        local srv = serve()
        local _g <close> = guard(srv)
        rejects(srv, head { case[2], "Host: a.example" } .. SMUGGLED, 400)
        srv:close()
      end)
    end)
  end
end)

describe("http hostile: request-target form against the method", function()
  -- RFC 9112 §3.2: "*" is OPTIONS's alone, a CONNECT's target is host:port, and no target has
  -- a fragment (all three reached the handler)
  for _, line in ipairs {
    "GET * HTTP/1.1", "HEAD * HTTP/1.1", "POST * HTTP/1.1", "OPTIONS *x HTTP/1.1",
    "CONNECT /x HTTP/1.1", "CONNECT * HTTP/1.1", "CONNECT http://example.com:443/ HTTP/1.1",
    "CONNECT example.com HTTP/1.1", "CONNECT example.com: HTTP/1.1", "CONNECT [::1] HTTP/1.1",
    "GET /a#frag HTTP/1.1", "GET /a?q=1#frag HTTP/1.1", "GET http://example.com/a#frag HTTP/1.1",
    "OPTIONS *#x HTTP/1.1", "CONNECT example.com:443#x HTTP/1.1",
  } do
    it(line .. " -> 400", function()
      run(function()
        local srv = serve()
        local _g <close> = guard(srv)
        rejects(srv, head { line, "Host: example.com:443" } .. SMUGGLED, 400)
        srv:close()
      end)
    end)
  end

  it("OPTIONS *, authority-form CONNECT and absolute-form targets are served", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      for _, line in ipairs { "OPTIONS * HTTP/1.1", "OPTIONS http://example.com HTTP/1.1",
                              "GET http://example.com/a?b=1 HTTP/1.1", "GET /a?b=/c HTTP/1.1" } do
        assert(s:write(head { line, "Host: example.com" }))
        assert.equal("HTTP/1.1 200 OK", (response(s)))
      end
      assert.same({ "*", "http://example.com", "http://example.com/a?b=1", "/a?b=/c" },
        { seen[1].target, seen[2].target, seen[3].target, seen[4].target })
      for _, target in ipairs { "example.com:443", "[::1]:443", "127.0.0.1:8080" } do
        calls, seen = 0, {}
        local data, how = exchange(srv, head { "CONNECT " .. target .. " HTTP/1.1", "Host: " .. target })
        assert.equal("closed", how)
        assert.matches("^HTTP/1%.1 200 ", data)
        assert.same({ "CONNECT", target }, { seen[1].method, seen[1].target })
      end
      srv:close()
    end)
  end)
end)

describe("http hostile: clients that vanish", function()
  -- waits (bounded) until the server holds no connection
  local function settle(srv)
    for _ = 1, 500 do
      if srv:connections() == 0 then return true end
      mw.sleep(0.01)
    end
    return false
  end

  it("a client closing mid-head leaves the server healthy", function()
    run(function()
      local srv = serve()
      local _g <close> = guard(srv)
      for _, partial in ipairs { "G", "GET / HTTP/1.1\r\nHo", "GET / HTTP/1.1\r\nHost: x\r\n" } do
        local s = connect(srv)
        assert(s:write(partial))
        s:close()
      end
      assert.is_true(settle(srv))
      assert.equal(0, calls)
      local req = accepts(srv, head { "GET /after HTTP/1.1", "Host: x" })
      assert.equal("/after", req.path)
      assert.equal(0, #errors)
      srv:close()
    end)
  end)

  it("a client closing mid-body: the reading handler gets an error; the server stays healthy", function()
    run(function()
      local entered = mw.channel(1)
      local result
      local srv = serve(nil, function(req, res)
        if req.path == "/upload" then
          entered:send(true)
          result = { req:body() }
          return res:send("late")
        end
        record(req, res)
      end)
      local _g <close> = guard(srv)
      local s = connect(srv)
      assert(s:write(head { "POST /upload HTTP/1.1", "Host: x", "Content-Length: 1000" } .. ("x"):rep(100)))
      assert(entered:recv(5))
      s:close()
      assert.is_true(settle(srv))
      assert.is_nil(result[1])
      assert.is_string(result[2])
      local req = accepts(srv, head { "GET /after HTTP/1.1", "Host: x" })
      assert.equal("/after", req.path)
      srv:close()
    end)
  end)

  it("a client closing mid-body of a streamed upload: body_reader raises, the server goes on", function()
    run(function()
      local entered = mw.channel(1)
      local got
      local srv = serve(nil, function(req, res)
        if req.path == "/upload" then
          entered:send(true)
          got = 0
          for chunk in req:body_reader() do got = got + #chunk end
          return res:send("late")
        end
        record(req, res)
      end)
      local _g <close> = guard(srv)
      local s = connect(srv)
      assert(s:write(head { "POST /upload HTTP/1.1", "Host: x", "Transfer-Encoding: chunked" }
        .. "64\r\n" .. ("x"):rep(100) .. "\r\n64\r\nxx"))
      assert(entered:recv(5))
      s:close()
      assert.is_true(settle(srv))
      assert.equal(1, #errors)
      assert.matches("request body", errors[1], 1, true)
      local req = accepts(srv, head { "GET /after HTTP/1.1", "Host: x" })
      assert.equal("/after", req.path)
      srv:close()
    end)
  end)

  it("a client closing while a large response streams: the write fails, the server goes on", function()
    run(function()
      local result
      local srv = serve(nil, function(req, res)
        if req.path == "/big" then
          local piece = ("z"):rep(256 * KiB)
          for _ = 1, 400 do   -- 100 MiB, far more than the socket buffers hold
            local ok, err = res:write(piece)
            if not ok then
              result = err
              return
            end
          end
          result = "finished"
          return
        end
        record(req, res)
      end)
      local _g <close> = guard(srv)
      local s = connect(srv)
      assert(s:write(head { "GET /big HTTP/1.1", "Host: x" }))
      assert.equal("HTTP/1.1 200 OK", s:read("l", 5))
      s:close()
      assert.is_true(settle(srv))
      assert.is_string(result)
      assert.are_not.equal("finished", result)
      local req = accepts(srv, head { "GET /after HTTP/1.1", "Host: x" })
      assert.equal("/after", req.path)
      srv:close()
    end, 20)
  end)
end)

describe("http hostile: timeouts", function()
  -- Trickles `first`, then `piece` every `every` seconds until the write fails (or n pieces).
  local function trickle(s, first, piece, every, n)
    return mw.spawn(function()
      if not s:write(first) then return end
      for _ = 1, n or 100 do
        if not mw.sleep(every) then return end
        if not s:write(piece) then return end
      end
    end)
  end

  it("slowloris: a head trickled in faster than any per-read timeout is cut off at timeouts.head", function()
    run(function()
      local srv = serve { timeouts = { head = 0.5 } }
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local t0 = mw.now()
      local writer = trickle(s, "GET / HTTP/1.1\r\n", "X-Slow: 1\r\n", 0.05)
      local data, how = read_all(s, 5)
      local elapsed = mw.now() - t0
      writer:cancel()
      writer:join()
      assert.equal("closed", how)
      assert.is_true(elapsed >= 0.45 and elapsed < 1.5, "cut off after " .. elapsed .. " s")
      if data ~= "" then assert.matches("^HTTP/1%.1 408 ", data) end
      assert.equal(0, calls)
      srv:close()
    end)
  end)

  -- Regression: each empty line (CRLF) before a request line re-armed the head timer (it
  -- started at the first byte after an empty buffer, and skipped lines leave it empty); on a
  -- kept-alive connection with idle > head, a client sending "\r\n" faster than the head
  -- timeout held the connection for the whole idle timeout without ever sending a request.
  -- The head timer now starts with the first byte of this request's wait (empty lines
  -- included) and nothing re-arms it; a wait with only empty lines seen ends at that deadline.
  it("empty lines before the request line do not restart the head timeout (kept-alive and fresh)", function()
    run(function()
      local srv = serve { timeouts = { head = 0.5, idle = 8 } }
      local _g <close> = guard(srv)
      local function blank_lines(s)
        local t0 = mw.now()
        -- 8 lines (the most skipped before a 400), one every 0.2 s: 1.4 s in all
        local writer = trickle(s, "\r\n", "\r\n", 0.2, 7)
        local data, how = read_all(s, 5)
        local elapsed = mw.now() - t0
        writer:cancel()
        writer:join()
        assert.equal("closed", how)
        if data ~= "" then assert.matches("^HTTP/1%.1 408 ", data) end
        assert.is_true(elapsed >= 0.45 and elapsed < 1.3, "closed after " .. elapsed .. " s")
      end
      local s <close> = connect(srv)
      assert(s:write(head { "GET / HTTP/1.1", "Host: x" }))
      assert.same({ "HTTP/1.1 200 OK", "handled GET /" }, { response(s) })
      blank_lines(s)
      local s2 <close> = connect(srv)
      blank_lines(s2)
      assert.equal(1, calls)
      srv:close()
    end)
  end)

  -- RFC 9112 §2.2: old clients send an empty line after a POST body. It must not start the
  -- next request's head timer (regression: with idle > head, such a connection was closed
  -- after `head` seconds, and a next request that began in time got 408).
  it("the empty line an old client sends after a POST body starts no head timer", function()
    run(function()
      local srv = serve { timeouts = { head = 0.5, idle = 8 } }
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "handled POST /" }, { response(s) })
      mw.sleep(0.8)           -- longer than head: the connection waits under idle
      assert(s:write(head { "GET / HTTP/1.1", "Host: x" }))
      assert.same({ "HTTP/1.1 200 OK", "handled GET /" }, { response(s) })
      -- the stray line is in the buffer when the next request's wait starts: the same
      assert(s:write("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "handled POST /" }, { response(s) })
      mw.sleep(0.3)
      assert(s:write("GET / HTTP/1.1\r\n"))
      mw.sleep(0.3)           -- this head began 0.3 s ago: within head, though 0.6 s after the line
      assert(s:write("Host: x\r\n\r\n"))
      assert.same({ "HTTP/1.1 200 OK", "handled GET /" }, { response(s) })
      assert.equal(4, calls)
      srv:close()
    end)
  end)

  it("a head that stops arriving gets 408", function()
    run(function()
      local srv = serve { timeouts = { head = 0.3 } }
      local _g <close> = guard(srv)
      local t0 = mw.now()
      local data = rejects(srv, "GET / HTTP/1.1\r\nHost: x\r\n", 408)
      local elapsed = mw.now() - t0
      assert.is_true(elapsed >= 0.25 and elapsed < 1.5, "answered after " .. elapsed .. " s")
      assert.matches("^HTTP/1%.1 408 ", data)
      srv:close()
    end)
  end)

  it("a client that never reads: the blocked write times out after timeouts.write, the connection closes",
    function()
    run(function()
      local result
      local srv = serve({ timeouts = { write = 0.5 } }, function(_, res)
        calls = calls + 1
        local piece = ("w"):rep(1024 * KiB)
        local t0 = mw.now()
        for _ = 1, 256 do   -- 256 MiB: far more than the socket buffers hold
          local ok, _, code = res:write(piece)
          if not ok then
            result = { code = code, elapsed = mw.now() - t0 }
            return
          end
        end
        result = { code = "finished" }
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "GET / HTTP/1.1", "Host: x" }))
      local deadline = mw.now() + 10
      while not result and mw.now() < deadline do mw.sleep(0.05) end
      assert.is_table(result, "the handler never returned")
      assert.equal("timeout", result.code)
      assert.is_true(result.elapsed < 5, "write timed out after " .. result.elapsed .. " s")
      local _, how = read_all(s, 10)
      assert.equal("closed", how)
      srv:close()
    end, 20)
  end)

  it("an idle keep-alive connection is closed after timeouts.idle (silently)", function()
    run(function()
      local srv = serve { timeouts = { idle = 0.3 } }
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      assert(s:write(head { "GET / HTTP/1.1", "Host: x" }))
      assert.same({ "HTTP/1.1 200 OK", "handled GET /" }, { response(s) })
      local t0 = mw.now()
      local data, how = read_all(s, 5)
      local elapsed = mw.now() - t0
      assert.equal("closed", how)
      assert.equal("", data)
      assert.is_true(elapsed >= 0.25 and elapsed < 1.5, "closed after " .. elapsed .. " s")
      -- a connection that never sends a byte, likewise
      local s2 <close> = connect(srv)
      t0 = mw.now()
      data, how = read_all(s2, 5)
      elapsed = mw.now() - t0
      assert.equal("closed", how)
      assert.equal("", data)
      assert.is_true(elapsed >= 0.25 and elapsed < 1.5, "closed after " .. elapsed .. " s")
      srv:close()
    end)
  end)

  it("a body trickled slower than timeouts.body allows: req:body() fails with 408 at the total", function()
    run(function()
      local result
      local srv = serve({ timeouts = { body = 0.5 } }, function(req, res)
        calls = calls + 1
        result = { req:body() }
        if not result[1] then
          res:status(result[3] or 500)
          return res:send(tostring(result[2]))
        end
        res:send("complete")
      end)
      local _g <close> = guard(srv)
      local s <close> = connect(srv)
      local t0 = mw.now()
      local writer = trickle(s, head { "POST / HTTP/1.1", "Host: x", "Content-Length: 1000" }, "x", 0.05)
      local line = s:read("l", 5)
      local elapsed = mw.now() - t0
      writer:cancel()
      writer:join()
      assert.equal("HTTP/1.1 408 Request Timeout", line)
      assert.is_nil(result[1])
      assert.equal(408, result[3])
      assert.is_true(elapsed >= 0.45 and elapsed < 1.5, "timed out after " .. elapsed .. " s")
      local _, how = read_all(s, 5)
      assert.equal("closed", how)
      srv:close()
    end)
  end)
end)
