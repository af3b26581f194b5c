-- res:send and res:header each have a C fast path (core.http_response_methods) beside their
-- Lua implementation (response.lua's send_lua and header_lua), which the C path calls for
-- anything it does not handle. Review #19's lesson: two of its defects came from a fast path
-- that drifted from its slow path. This spec runs the same cases through both and compares
-- the bytes on the wire: the fast path (gzip off, string header values) against the slow
-- one (gzip on from 0 bytes with a content type it does not compress, so send_lua runs and
-- leaves the body as it is; number header values, which only header_lua takes).
local helper = require "spec.helper"
local mw = helper.mw
local http = require "moonwire.http"

local CASES = {
  { "GET", "1.1", 200, "hello" },
  { "GET", "1.1", 200, "" },
  { "HEAD", "1.1", 200, "hello" },
  { "GET", "1.1", 204, "" },
  { "GET", "1.1", 304, "" },
  { "GET", "1.1", 404, "not here" },
  { "GET", "1.0", 200, "old client" },
  { "GET", "1.0 keep", 200, "old client, kept" },
  { "GET", "1.1 close", 200, "closing" },
  { "POST", "1.1", 201, ("x"):rep(3000) },
  -- a 2xx to CONNECT: no Content-Length, no body (RFC 9110 §9.3.6); a 4xx keeps both
  { "CONNECT", "1.1", 200, "tunnel-body" },
  { "CONNECT", "1.1", 403, "no tunnels" },
  -- a request body the handler leaves unread (5th field, what the client sends): drained
  -- when small (keep-alive); not drained, and the answer says Connection: close, when a 100
  -- Continue is still awaited or the declared length is over 64 KiB (http.c: unread_closes)
  { "POST", "1.1", 200, "small, unread", "small" },
  { "POST", "1.1", 200, "expect, unread", "expect" },
  { "POST", "1.1", 200, "big, unread", "big" },
}

-- what the client sends after the head of a POST, by the case's 5th field
local BODIES = {
  read = "Content-Length: 4\r\n\r\nbody",
  small = "Content-Length: 4\r\n\r\nbody",
  expect = "Expect: 100-continue\r\nContent-Length: 4\r\n\r\n",
  big = "Content-Length: 100000\r\n\r\n" .. ("b"):rep(1000),
}

-- one request on a fresh connection; the response head (less Date) and body as received
-- (after the body, until the close, when the connection closes: CONNECT, a body not drained)
local function exchange(port, method, version, path, sends)
  local s <close> = assert(mw.tcp.connect("127.0.0.1", port, { timeout = 5 }))
  local v, extra = version:match("^(%S+)%s*(%S*)$")
  -- (a CONNECT's target is an authority: "case11.example:443")
  if method == "CONNECT" then path = path:sub(2) .. ".example:443" end
  local req = ("%s %s HTTP/%s\r\nHost: x\r\n"):format(method, path, v)
  if extra == "keep" then req = req .. "Connection: keep-alive\r\n" end
  if extra == "close" then req = req .. "Connection: close\r\n" end
  if method == "POST" then req = req .. BODIES[sends or "read"] else req = req .. "\r\n" end
  assert(s:write(req))
  local head, len = {}, nil
  while true do
    local l = assert(s:read("l"))
    if l == "" then break end
    if not l:lower():find("^date:") then head[#head + 1] = l end
    len = len or tonumber(l:lower():match("^content%-length: (%d+)"))
  end
  local body = ""
  if len and len > 0 and method ~= "HEAD" then body = assert(s:read(len)) end
  if method == "CONNECT" or sends == "expect" or sends == "big" then    -- it closes: what else came
    while true do
      local piece = s:recv(65536, 5)
      if not piece then break end
      body = body .. piece
    end
  end
  return table.concat(head, "\n"), body
end

local function serve(opts, numbers)
  opts.host, opts.port = "127.0.0.1", 0
  opts.handler = function(req, res)
    local c = CASES[tonumber(req.path:match("%d+"))]
    res:status(c[3])
    res:header("content-type", "application/octet-stream")
    res:header("x-count", numbers and 42 or "42")          -- a number: header_lua only
    res:header("x-case", numbers and tonumber(req.path:match("%d+")) or req.path:match("%d+"))
    if req.method == "POST" and not c[5] then assert(req:body()) end
    res:send(c[4])
  end
  return assert(http.server(opts))
end

describe("res:send and res:header: the C fast path and the Lua path agree", function()
  it("on every case, byte for byte", function()
    helper.run(function()
      local fast = serve({ gzip = false }, false)
      local slow = serve({ gzip = true, gzip_min = 0 }, true)
      for i, c in ipairs(CASES) do
        local h1, b1 = exchange(fast.port, c[1], c[2], "/case" .. i, c[5])
        local h2, b2 = exchange(slow.port, c[1], c[2], "/case" .. i, c[5])
        assert.equal(h1, h2, ("case %d (%s HTTP/%s %d)"):format(i, c[1], c[2], c[3]))
        assert.equal(b1, b2, ("case %d body"):format(i))
        assert.matches("x%-count: 42", h1)
        if c[1] == "CONNECT" and c[3] < 300 then
          assert.is_nil(h1:lower():find("content%-length"), h1)
          assert.is_nil(h1:lower():find("transfer%-encoding"), h1)
          assert.equal("", b1)
        elseif c[1] == "CONNECT" then
          assert.equal(c[4], b1)
        end
        if c[5] then
          local close = c[5] ~= "small"
          assert.equal(close, h1:lower():find("connection: close", 1, true) ~= nil, h1)
          assert.equal(c[4], b1)        -- (and nothing after it: the connection closed)
        end
      end
      fast:close(0)
      slow:close(0)
    end, 30)
  end)

  -- HTTP/2 (h2.lua's R2.send in C, core.h2_response_send, beside its Lua send_lua): the same
  -- cases plus a trailer and a streamed response, which only the Lua path takes; the fast
  -- server's answers must equal the slow one's, field for field
  it("over HTTP/2, on every case, field for field", function()
    helper.run(function()
      local function serve2(opts)
        opts.host, opts.port = "127.0.0.1", 0
        opts.handler = function(req, res)
          local i = tonumber(req.path:match("%d+"))
          local c = CASES[i]
          if req.method == "POST" then assert(req:body()) end
          if c then
            res:status(c[3])
            res:header("content-type", "application/octet-stream")
            res:header("x-case", tostring(i))
            res:send(c[4])
          elseif i == 100 then
            res:trailer("x-sum", "1234")
            res:send("with a trailer")
          elseif i == 101 then
            res:header("x-case", "101")
            res:send()                                   -- nil: the Lua path
          end
        end
        return assert(http.server(opts))
      end
      local fast = serve2({ gzip = false })
      local slow = serve2({ gzip = true, gzip_min = 0 })
      local function get(port, i, method)
        local r = assert(http.request { url = ("http://127.0.0.1:%d/case%d"):format(port, i), method = method,
          body = method == "POST" and "body" or nil, http2 = true, timeout = 5 })
        assert.equal("2", r.version)
        local body = assert(r:body())
        local h = {}
        for k, v in pairs(r.headers) do if k ~= "date" then h[#h + 1] = k .. ": " .. tostring(v) end end
        table.sort(h)
        local tr = {}
        for k, v in pairs(r.trailers or {}) do tr[#tr + 1] = k .. ": " .. v end
        return r.status, table.concat(h, "\n"), body, table.concat(tr, "\n")
      end
      local ids = {}
      -- (a CONNECT has no :path: the next test sends it)
      for i, c in ipairs(CASES) do if c[2] == "1.1" and c[1] ~= "CONNECT" then ids[#ids + 1] = { i, c[1] } end end
      ids[#ids + 1] = { 100, "GET" }
      ids[#ids + 1] = { 101, "GET" }
      for _, id in ipairs(ids) do
        local a = { get(fast.port, id[1], id[2]) }
        local b = { get(slow.port, id[1], id[2]) }
        assert.same(b, a, ("case %d (%s)"):format(id[1], id[2]))
        if id[1] == 100 then assert.equal("x-sum: 1234", a[4]) end
        if id[1] == 1 then
          assert.matches("content%-length: 5", a[2])
          assert.matches("server: moonwire", a[2])
          assert.equal("hello", a[3])
        end
      end
      fast:close(0)
      slow:close(0)
    end, 30)
  end)

  -- a plain CONNECT over HTTP/2 (RFC 9113 §8.5: :authority, no :path; python-h2 sends it, the
  -- moonwire client cannot): its 2xx has no content-length and no DATA, on both paths (the
  -- C one sent both), a 403 has them
  it("over HTTP/2, a 2xx to a plain CONNECT has no content-length and no DATA", function()
    helper.run(function()
      local function serve2(opts)
        opts.host, opts.port = "127.0.0.1", 0
        opts.handler = function(req, res)
          assert.equal("CONNECT", req.method)
          res:status(tonumber(req.target:match("^s(%d+)")))
          res:header("x-a", "1")
          res:send("tunnel-body")
        end
        return assert(http.server(opts))
      end
      local fast = serve2({ gzip = false })
      local slow = serve2({ gzip = true, gzip_min = 0 })
      local function connect(port, status)
        local file = helper.writefile(os.tmpname() .. ".py", ([[
import socket, json
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", %d), timeout=5)
c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
c.initiate_connection()
c.send_headers(1, [(":method", "CONNECT"), (":authority", "s%d.example:443")])
s.sendall(c.data_to_send())
out = {"data": ""}
done = False
while not done:
    data = s.recv(65536)
    if not data: break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            out["headers"] = sorted(k.decode() + ": " + v.decode() for k, v in e.headers if k != b"date")
        elif isinstance(e, h2.events.DataReceived):
            out["data"] += e.data.decode()
        elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and not done:
            out["end"] = type(e).__name__      # (a reset, NO_ERROR, may follow the end)
            done = True
    s.sendall(c.data_to_send())
print(json.dumps(out))
]]):format(port, status))
        local code, out, err = helper.shell("/usr/bin/python3 " .. file, 10)
        os.remove(file)
        assert.equal(0, code, tostring(err) .. tostring(out))
        return out
      end
      for _, st in ipairs { 200, 403 } do
        local a, b = connect(fast.port, st), connect(slow.port, st)
        assert.equal(b, a, "status " .. st)
        assert.matches('"end": "StreamEnded"', a)
        assert.matches('":status: ' .. st .. '"', a, 1, true)
        assert.matches('"x-a: 1"', a, 1, true)
        if st == 200 then
          assert.is_nil(a:find("content-length", 1, true), a)
          assert.matches('"data": ""', a, 1, true)
        else
          assert.matches('"content-length: 11"', a, 1, true)
          assert.matches('"data": "tunnel-body"', a, 1, true)
        end
      end
      fast:close(0)
      slow:close(0)
    end, 30)
  end)
end)
