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
}

-- one request on a fresh connection; the response head (less Date) and body as received
local function exchange(port, method, version, path)
  local s <close> = assert(mw.tcp.connect("127.0.0.1", port, { timeout = 5 }))
  local v, extra = version:match("^(%S+)%s*(%S*)$")
  local req = ("%s %s HTTP/%s\r\nHost: x\r\n"):format(method, path, v)
  if extra == "keep" then req = req .. "Connection: keep-alive\r\n" end
  if extra == "close" then req = req .. "Connection: close\r\n" end
  if method == "POST" then req = req .. "Content-Length: 4\r\n\r\nbody" else req = req .. "\r\n" end
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
    if req.method == "POST" then assert(req:body()) end
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
        local h1, b1 = exchange(fast.port, c[1], c[2], "/case" .. i)
        local h2, b2 = exchange(slow.port, c[1], c[2], "/case" .. i)
        assert.equal(h1, h2, ("case %d (%s HTTP/%s %d)"):format(i, c[1], c[2], c[3]))
        assert.equal(b1, b2, ("case %d body"):format(i))
        assert.matches("x%-count: 42", h1)
      end
      fast:close(0)
      slow:close(0)
    end, 30)
  end)
end)
