--- The request object handed to HTTP handlers.
-- The C core builds each request table and gives it this metatable. Its parsed fields sit in
-- array slots (a table costs Lua a hash insertion per named field, an array slot much less)
-- and are read by name through __index: method, target, version, path, keepalive, upgrade.
-- Everything else is computed on first use and cached in the table. The other array slots
-- are private: 1 the connection object, 2 the response (response.lua sets it), 3 whether the
-- message ended with its head (the server's keep-alive check), 4 the head's bytes, until
-- `headers` is built from them.
local now = require("moonwire").now

local Request = {}
local CONN <const> = 1
local RES <const> = 2
local METHOD <const> = 6
local TARGET <const> = 7
local VERSION <const> = 8
local PATH <const> = 9
local KEEPALIVE <const> = 10
local UPGRADE <const> = 5
Request.slots = { CONN = CONN, RES = RES, METHOD = METHOD, TARGET = TARGET, VERSION = VERSION, PATH = PATH,
  KEEPALIVE = KEEPALIVE, UPGRADE = UPGRADE }

-- the parsed fields, by name (a value assigned to one of these names is kept in the table
-- and read from there instead)
local named = { method = METHOD, target = TARGET, version = VERSION, path = PATH, keepalive = KEEPALIVE,
  upgrade = UPGRADE }

local lazy = {}   -- fields computed on first access

-- application/x-www-form-urlencoded (queries, form bodies): repeated keys give arrays
local parse_urlencoded = require("moonwire.url").parse_query

-- Case-insensitive header lookups: the table holds lower-case names.
local headers_mt = {
  __index = function(t, k)
    if type(k) == "string" then
      local lk = k:lower()
      if lk ~= k then return rawget(t, lk) end
    end
  end,
}

function lazy.remote_addr(req)
  local host, port = req.socket:getpeername()
  rawset(req, "remote_port", port)
  return host
end

function lazy.remote_port(req)
  local _, port = req.socket:getpeername()
  return port
end

-- the connection's socket and the server (kept by the connection object, not copied into
-- every request)
function lazy.socket(req)
  return req[CONN]:socket()
end

function lazy._server(req)
  return req[CONN]:server() or false
end

-- the header table, built from the head the C core kept (slots 4 and 5) on first use
function lazy.headers(req)
  return req[CONN]:headers_of(req)
end

-- what follows the first "?" of the target
function lazy.query_string(req)
  local q = req.target:find("?", 1, true)
  return q and req.target:sub(q + 1) or ""
end

function lazy.params()
  return {}
end

-- trailer fields of a chunked body, once the body was read (nil before, or without any)
function lazy.trailers(req)
  local t = req[CONN]:trailers()
  if t then setmetatable(t, headers_mt) end
  return t
end

-- TLS details of an https request (version, cipher, alpn, sni, peer_subject for mTLS), or nil
function lazy.tls(req)
  return req.socket:tls_info() or false
end

-- HTTP/2's pseudo-headers (the stream knows them; HTTP/1.1 has none: nil)
function lazy.scheme(req)
  local c = req[CONN]
  return c.pseudo and c:pseudo(":scheme") or (req.tls and "https" or "http")
end

function lazy.authority(req)
  local c = req[CONN]
  return c.pseudo and c:pseudo(":authority") or nil
end

function lazy.protocol(req)
  local c = req[CONN]
  return c.pseudo and c:pseudo(":protocol") or nil
end

local methods = {}

function Request:__index(k)
  local i = named[k]
  if i then return self[i] end     -- (a nil slot comes back here with an integer: nil)
  local m = methods[k]
  if m then return m end
  local f = lazy[k]
  if f then
    local v = f(self)
    rawset(self, k, v)
    return v
  end
end

-- the C core gives request headers this metatable (case-insensitive lookups)
Request.headers_mt = headers_mt

function methods:query()
  local q = rawget(self, "_query")
  if not q then
    q = parse_urlencoded(self.query_string)
    rawset(self, "_query", q)
  end
  return q
end

--- Every value of a header field, in order.
function methods:header_list(name)
  local lname = name:lower()
  local _ = self.headers          -- built on first use, with _multi
  local multi = rawget(self, "_multi")
  local list = multi and multi[lname]
  if list then return table.move(list, 1, #list, 1, {}) end
  local v = self.headers[lname]
  return v and { v } or {}
end

-- Sends "100 Continue" before the first body read, if the client asked for it; not for a
-- body whose declared length is already over `max` (the read answers 413 at once: the
-- client is not invited to send what will be dropped).
local function continue_if_expected(self, max)
  local hc = self[CONN]
  local _, _, expect, _, length = hc:state()
  if expect then
    hc:clear_expect()
    local res = rawget(self, RES)
    if not (res and res.sent) and not (max and length and length > max) then
      self.socket:write("HTTP/1.1 100 Continue\r\n\r\n")
    end
  end
end

-- Reading the body failed: the status to answer with (400, 413, 408; anything else: the
-- client is gone) and the message are kept, and a response not sent yet is answered with
-- them whatever the handler does (response.lua: Response.Failed); the connection closes.
local function body_failed(self, err, status)
  rawset(self, "_body_error", status or true)
  rawset(self, "_body_errmsg", err)
  local res = rawget(self, RES)
  if res and not res.sent then setmetatable(res, getmetatable(res).Failed) end
end

--- The whole body (at most the server's limits.body bytes), or nil, err, code.
function methods:body()
  local cached = rawget(self, "_body")
  if cached then return cached end
  local srv = self._server
  continue_if_expected(self, srv.limits.body)
  local body, err, status = self[CONN]:read_body("all", srv.limits.body, srv.timeouts.body)
  if not body then
    body_failed(self, err, status)
    return nil, err, status
  end
  rawset(self, "_body", body)
  return body
end

--- An iterator over the body's chunks, for bodies of any size. timeouts.body bounds the
-- whole body, from the first read (each read waits at most what is left of it).
function methods:body_reader()
  continue_if_expected(self)
  local hc, limit = self[CONN], self._server.timeouts.body
  local deadline
  return function()
    deadline = deadline or now() + limit
    local chunk, err, status = hc:read_body("chunk", -1, limit < 0 and limit or math.max(0, deadline - now()))
    if chunk == nil and err then
      body_failed(self, err, status)
      error("request body: " .. tostring(err), 2)
    end
    return chunk
  end
end

function methods:form()
  local ct = self.headers["content-type"] or ""
  if not ct:lower():find("^application/x%-www%-form%-urlencoded") then return {} end
  local body, err, code = self:body()
  if not body then return nil, err, code end
  return parse_urlencoded(body)
end

--- Upgrades to a WebSocket: see docs/websocket.md.
function methods:websocket(opts)
  return require("moonwire.websocket").upgrade(self, opts)
end

function methods:cookies()
  local c = rawget(self, "_cookies")
  if c then return c end
  c = {}
  local h = self.headers.cookie
  if h then
    for pair in h:gmatch("[^;]+") do
      local k, v = pair:match("^%s*([^=]-)%s*=%s*(.-)%s*$")
      if k and k ~= "" and c[k] == nil then
        if v:sub(1, 1) == '"' and v:sub(-1) == '"' then v = v:sub(2, -2) end
        c[k] = v
      end
    end
  end
  rawset(self, "_cookies", c)
  return c
end

return Request
