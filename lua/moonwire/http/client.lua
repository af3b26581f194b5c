--- The HTTP client: pooled keep-alive connections per origin, streaming bodies both ways,
-- redirects, timeouts, gzip/deflate decoding, HTTP proxies. HTTP/1.1 responses are parsed by
-- llhttp in C (the same glue as the server, in response mode); HTTP/2 (h2 by ALPN on https,
-- prior knowledge with http2 = true) multiplexes the requests of every task over one
-- connection per origin (h2client.c, libnghttp2).
local mw = require "moonwire"
local core = require "moonwire.core"
local url = require "moonwire.url"
local seconds = require("moonwire.opts").seconds

local http_conn, request_head, h2_client = core.http_conn, core.http_request_head, core.h2_client
local check_fields = core.h2_check_fields
local park, unpark, current = core.park, core.unpark, core.current

local M = {}

-- case-insensitive lookups in headers tables (the C core sets it on responses)
local headers_mt = {
  __index = function(t, k)
    if type(k) == "string" then
      local lk = k:lower()
      if lk ~= k then return rawget(t, lk) end
    end
  end,
}

-- Parsed URLs, reused (read-only) by the requests that name the same URL.
local url_cache, url_cached = {}, 0
local function parse_cached(s)
  local u = url_cache[s]
  if u then return u end
  local err
  u, err = url.parse(s)
  if not u then return nil, err end
  if url_cached >= 512 then url_cache, url_cached = {}, 0 end
  url_cache[s], url_cached = u, url_cached + 1
  return u
end


local Client = {}
Client.__index = Client

local Response = {}   -- metatable of response tables (built in C)
local methods = {}

local defaults = {
  max_per_origin = 10,      -- connections per origin; more requests wait for a free one
  max_idle = 32,            -- idle connections kept per origin
  idle_timeout = 30,        -- an idle connection older than this is not reused
  timeout = 30,             -- connect + send + response head, as one deadline
  connect_timeout = 10,     -- DNS + TCP connect
  local_host = nil,         -- bind TCP connections to this local address (an IP literal)
  read_timeout = nil,       -- each body read (default: timeout)
  redirects = 5,
  max_body = 64 * 1024 * 1024,
  decompress = false,
  user_agent = "moonwire/" .. mw.version,
  max_head = 65536,
  max_headers = 200,
  http2 = nil,              -- nil: h2 by ALPN on https; true: also prior knowledge on http; false: 1.1 only
  h2_stream_window = 1048576,     -- HTTP/2 receive window per stream
  h2_conn_window = 16777216,      -- HTTP/2 receive window of the connection
}

-- method names callers commonly pass, already upper-case (no string work per request)
local upper = { GET = "GET", get = "GET", POST = "POST", post = "POST", PUT = "PUT", put = "PUT",
  HEAD = "HEAD", head = "HEAD", DELETE = "DELETE", delete = "DELETE", PATCH = "PATCH", patch = "PATCH",
  OPTIONS = "OPTIONS", options = "OPTIONS" }

-- Interim (1xx) responses skipped before a request fails: a server may send 100 Continue
-- and a few 103 Early Hints, never this many (h2client.c's limit, the same over HTTP/2).
local MAX_INTERIM = core.http_max_interim

local idempotent = { GET = true, HEAD = true, PUT = true, DELETE = true, OPTIONS = true, TRACE = true }

-- Write failures after which the server may have answered already: it answered before
-- reading the whole body (413, 401) and closed, and the rest of our upload reset the
-- connection. Its answer may be in the receive buffer (see exchange).
local answered_early = { EPIPE = true, ECONNRESET = true }

local function argerror(n, fname, msg, level)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), (level or 2) + 1)
end

-- Settings (of a client, and those a request may give for itself) of a known kind, checked
-- where they are given: a bad one would otherwise fail later, elsewhere, or not at all
-- (`redirects = -1` returned nothing). Returns the value to keep (a numeric string's number).
local kinds = {
  max_per_origin = "count", max_head = "count", max_headers = "count", h2_stream_window = "count",
  h2_conn_window = "count", max_idle = "count0", redirects = "count0",
  idle_timeout = "seconds", timeout = "seconds", connect_timeout = "seconds", read_timeout = "seconds",
  max_body = "size", decompress = "boolean", http2 = "boolean", user_agent = "string",
}
local function checked(fname, k, v, level)
  local kind = kinds[k]
  if v == nil or not kind then return v end
  local n, given = tonumber(v), v
  local ok
  if kind == "count" or kind == "count0" then
    ok = math.type(v) and math.tointeger(v) and v >= (kind == "count" and 1 or 0)
    if k == "redirects" and v == false then ok = true end
  elseif kind == "seconds" then
    v = seconds(v)
    ok = v ~= nil
  elseif kind == "size" then
    ok = type(v) == "number" and v >= 0
  elseif kind == "boolean" then
    ok = type(v) == "boolean"
  else
    ok = type(v) == "string" or v == false
  end
  if not ok then
    local want = ({ count = "positive integer", count0 = "non-negative integer", seconds = "number",
      size = "non-negative number", boolean = "boolean", string = "string or false" })[kind]
    if k == "redirects" then want = "non-negative integer or false" end
    error(("bad argument #1 to '%s' (bad option '%s' (%s expected, got %s))"):format(fname, k, want,
      n ~= n and "nan" or type(given)), level + 1)
  end
  return v
end

-- ---------------------------------------------------------------------------------------
-- base64 for Basic credentials

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(s)
  return (s:gsub("..?.?", function(chunk)
    local a, b, c = chunk:byte(1, 3)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local out = {}
    for i = 1, 4 do
      local idx = (n >> (6 * (4 - i))) & 63
      out[i] = b64chars:sub(idx + 1, idx + 1)
    end
    if not b then out[3], out[4] = "=", "=" elseif not c then out[4] = "=" end
    return table.concat(out)
  end))
end
M.base64 = base64

-- ---------------------------------------------------------------------------------------
-- the pool

local function pool_of(self, key)
  local p = self._pools[key]
  if not p then
    p = { idle = {}, active = 0, waiters = { first = 1, last = 0 } }
    self._pools[key] = p
  end
  return p
end

-- Waits in the pool's queue of tasks (an HTTP/1.1 or an HTTP/2 pool) until wake_waiter or
-- wake_all lets it go: true, or nil, err, code when the wait failed (its place is given up).
local function wait_turn(p)
  local me = current()
  if not me then error("blocking call outside a task", 4) end
  local w = p.waiters
  w.last = w.last + 1
  w[w.last] = me
  local ok, err, code = park()
  if not ok then
    for i = w.first, w.last do if w[i] == me then w[i] = false end end
    return nil, err, code
  end
  return true
end

local function wake_waiter(p)
  local w = p.waiters
  while w.first <= w.last do
    local t = w[w.first]
    w[w.first] = nil
    w.first = w.first + 1
    if t and unpark(t, true) then return end
  end
end

-- Returns a connection record {sock, hc, pool, reused} or nil, err, code. `fresh`: a new
-- connection, not an idle one (the retry after a pooled one turned out closed: the others
-- idle since the same moment are likely closed too).
local function checkout(self, key, connect, fresh)
  local p = pool_of(self, key)
  while true do
    local idle = p.idle
    local now = mw.now()
    while #idle > 0 and not fresh do
      local c = table.remove(idle)
      local age = now - c.idle_since
      -- alive() (one MSG_PEEK recv) on every checkout, however short the idle time: a
      -- response the server sent unasked after the last one would otherwise be read as this
      -- request's answer, and a close it sent meanwhile would fail a request that cannot be
      -- retried (a POST) when a fresh connection would do; a close that crosses our request
      -- is still caught by the retry in exchange() for idempotent requests
      if age < self.idle_timeout and c.sock:alive() then
        p.active = p.active + 1
        c.reused, c.released = true, false
        return c
      end
      c.sock:close()
    end
    if p.active < self.max_per_origin then
      p.active = p.active + 1
      local done, sock, err, code = pcall(connect)   -- (a bad option raises: the slot goes back)
      if not done then
        p.active = p.active - 1
        wake_waiter(p)
        error(sock, 0)
      end
      if not sock then
        p.active = p.active - 1
        wake_waiter(p)
        return nil, err, code
      end
      sock:settimeout(self.read_timeout or self.timeout)
      local c = { sock = sock, pool = p, reused = false }
      c.hc = http_conn(sock, self._limits, Response, true, headers_mt)
      return c
    end
    local ok, err, code = wait_turn(p)
    if not ok then return nil, err, code end
  end
end

local function release(self, c, reusable)
  if c.released then return end
  c.released = true
  local p = c.pool
  p.active = p.active - 1
  local waiting = p.waiters.first <= p.waiters.last
  -- bytes after the response (a 204 with a body...) would be the next request's answer
  if reusable and c.sock:buffered() > 0 then reusable = false end
  if reusable and (#p.idle < self.max_idle or waiting) and not self._closed then
    c.idle_since = mw.now()
    p.idle[#p.idle + 1] = c
  else
    c.sock:close()
  end
  wake_waiter(p)
end

-- ---------------------------------------------------------------------------------------
-- responses


function Response.__index(_, k)
  return methods[k]
end

local function done_with(res, reusable)
  local c = rawget(res, "_c")
  if c then
    if rawget(res.headers, "transfer-encoding") then   -- only chunked bodies have trailers
      local tr = c.hc:trailers()
      if tr then rawset(res, "trailers", setmetatable(tr, headers_mt)) end
    end
    rawset(res, "_c", nil)
    release(c.client, c, reusable)
  end
end

local function finished(res)
  local c = rawget(res, "_c")
  if c and c.hc:msg_done() then done_with(res, res.keepalive) end
end

-- "deflate" is meant as zlib framing (RFC 9110 §8.4.1.2), but some servers send raw
-- deflate; browsers and curl take both. The first two bytes tell: a zlib header (CM 8,
-- CINFO <= 7, a multiple of 31) or gzip's magic go to an "auto" inflater, anything else to a
-- raw one. Same interface as an inflater.
local Deflate = {}
Deflate.__index = Deflate

function Deflate:decompress(data, max)
  local inf = self.inf
  if not inf then
    local head = self.head .. data
    if #head < 2 then
      self.head = head
      return ""
    end
    local b0, b1 = head:byte(1, 2)
    local zlib = (b0 & 15) == 8 and (b0 >> 4) <= 7 and (b0 * 256 + b1) % 31 == 0
    inf = core.inflater((zlib or (b0 == 0x1f and b1 == 0x8b)) and "auto" or "raw")
    self.inf, self.head, data = inf, nil, head
  end
  return inf:decompress(data, max)
end

-- Several codings, applied in the order listed: decoded from the last to the first. The
-- whole has ended when every stage has.
local Chain = {}
Chain.__index = Chain

function Chain:decompress(data, max)
  local ended = true
  for i = #self, 1, -1 do
    local out, e, code = self[i]:decompress(data, max)
    if not out then return nil, e, code end
    if e ~= "end" then ended = false end
    data = out
  end
  return data, ended and "end" or nil
end

local function stage_for(coding)
  if coding == "gzip" or coding == "x-gzip" then return core.inflater("gzip") end
  if coding == "deflate" then return setmetatable({ head = "" }, Deflate) end
  return nil
end

-- The decoder of the response's Content-Encoding (every field, each a list of codings),
-- nil when there is none to undo (or decompress is off), or false, err for a coding we
-- cannot undo (never a body handed over still coded as if it were decoded).
local function decoder_for(res)
  if not res._decompress then return nil end
  local ce = res.headers["content-encoding"]
  if not ce then return nil end
  local stages = {}
  for coding in ce:lower():gmatch("[^,]+") do
    coding = coding:match("^[ \t]*(.-)[ \t]*$")
    if coding ~= "" and coding ~= "identity" then
      local stage = stage_for(coding)
      if not stage then return false, "unsupported content coding '" .. coding .. "'" end
      stages[#stages + 1] = stage
    end
  end
  if #stages <= 1 then return stages[1] end
  return setmetatable(stages, Chain)
end

-- What is left of the request's deadline (body reads share it), or the client's read_timeout.
function methods:_body_timeout()
  local c = rawget(self, "_c")
  local cl = rawget(self, "_client") or (c and c.client)
  local rt = cl and cl.read_timeout
  local deadline = rawget(self, "_deadline")
  if deadline then
    local left = math.max(0, deadline - mw.now())
    if rt and rt < left then return rt end
    return left
  end
  return rt or (cl and cl.timeout)
end

-- HTTP/2 responses: the stream's end (trailers kept; a body not read to the end resets it)
local function h2_done(res, complete)
  local s = rawget(res, "_s")
  if not s then return end
  rawset(res, "_s", nil)
  if complete then
    local tr = s:trailers()
    if tr then rawset(res, "trailers", setmetatable(tr, headers_mt)) end
  else
    s:reset()
  end
end

-- What a whole-body read gave (HTTP/1.1 or HTTP/2 alike): decoded (gzip/deflate) and kept,
-- and the connection handed to done(self, reusable), or nil, err, code.
local function whole_body(self, done, reusable, body, err, code)
  if not body then
    done(self, false)
    return nil, err, code
  end
  local dec, cerr = decoder_for(self)
  if dec == false and body ~= "" then
    done(self, false)
    return nil, "response body: " .. cerr, "http"
  end
  if dec and body ~= "" then
    local out, derr, dcode = dec:decompress(body, self._max_body)
    if not out then
      done(self, false)
      return nil, "response body: " .. derr, dcode
    end
    if derr ~= "end" then     -- cut short: never a shorter body as a success
      done(self, false)
      return nil, "response body: the compressed data ends early", "http"
    end
    body = out
  end
  rawset(self, "_body", body)
  done(self, reusable)
  return body
end

local function h2_body(self)
  local s = rawget(self, "_s")
  return whole_body(self, h2_done, true, s:read("all", self._max_body, self:_body_timeout()))
end

-- The next chunk of the body from the response's HTTP/2 stream or HTTP/1.1 connection: a
-- string; nil at the end (nil, err on a failure); false once the connection was let go.
local function h2_read_chunk(self, timeout)
  local s = rawget(self, "_s")
  if not s then return false end
  return s:read("chunk", -1, timeout)
end

local function h1_read_chunk(self, timeout)
  local c = rawget(self, "_c")
  if not c then return false end
  return c.hc:read_body("chunk", -1, timeout)
end

-- body_reader decodes in bounded pieces, whatever the body's size (max_body limits body()
-- alone): each stage is fed at most SLICE bytes per call, and deflate gives at most 1032
-- bytes per byte of input, so one call's output stays below PIECE_MAX (the inflater's cap,
-- which valid data never reaches); what a slice gives is handed over before the next slice
-- is fed. (Decoding a chunk whole, capped at max_body, failed a large body on its first chunk.)
local SLICE = 4096
local PIECE_MAX = SLICE * 1032 + 65536

-- A decoder's stages in decoding order (a Chain lists them in coding order).
local function stages_of(dec)
  if getmetatable(dec) ~= Chain then return { dec } end
  local list = {}
  for i = #dec, 1, -1 do list[#list + 1] = dec[i] end
  return list
end

-- Feeds data through `stages` one slice at a time: a function giving the next decoded piece
-- (never ""), or nil once the data given so far is used up; add(data) gives more, ended()
-- whether every stage fed ended with its last data. Raises "response body: ..." on bad data.
local function slicer(stages)
  local n = #stages
  local pend, pos, fed, ended = {}, {}, {}, {}
  for j = 1, n do pend[j], pos[j] = "", 1 end
  local function piece(j)
    while true do
      local p = pend[j]
      if pos[j] <= #p then
        local slice = (pos[j] == 1 and #p <= SLICE) and p or p:sub(pos[j], pos[j] + SLICE - 1)
        pos[j] = pos[j] + #slice
        local out, derr = stages[j]:decompress(slice, PIECE_MAX)
        if not out then error("response body: " .. tostring(derr), 0) end
        -- (a gzip body may hold several members: "end" holds only at a member's end)
        fed[j], ended[j] = true, derr == "end"
        if out ~= "" then return out end
      else
        local input = j > 1 and piece(j - 1)
        if not input then return nil end
        pend[j], pos[j] = input, 1
      end
    end
  end
  local function add(data) pend[1], pos[1] = data, 1 end
  local function all_ended()
    for j = 1, n do if fed[j] and not ended[j] then return false end end
    return true
  end
  return function() return piece(n) end, add, all_ended
end

-- A body's chunks as an iterator, decoded, in constant memory; raises on an I/O error (and
-- on compressed data cut short). Each read waits at most read_timeout (default: timeout).
-- One path for both versions: `read` is h2_read_chunk or h1_read_chunk, `done(self,
-- reusable)` lets the connection go, reusable when the body ended (`keep`).
local function chunk_reader(self, read, done, keep)
  local timeout = rawget(self, "_read_timeout") or self:_body_timeout()
  local dec, cerr = decoder_for(self)
  local next_piece, add, ended
  if dec then next_piece, add, ended = slicer(stages_of(dec)) end
  return function()
    while true do
      if dec then
        local ok, out = pcall(next_piece)
        if not ok then
          done(self, false)
          error(out, 2)
        end
        if out then return out end
      end
      local chunk, err = read(self, timeout)
      if chunk == false then return nil end
      if chunk == nil then
        if err then
          done(self, false)
          error("response body: " .. tostring(err), 2)
        end
        if dec and not ended() then
          done(self, false)
          error("response body: the compressed data ends early", 2)
        end
        done(self, keep)
        return nil
      end
      if dec == false and chunk ~= "" then
        done(self, false)
        error("response body: " .. cerr, 2)
      end
      if dec then
        add(chunk)
      else
        return chunk
      end
    end
  end
end

--- The whole body (at most max_body bytes, after decoding), or nil, err, code.
function methods:body()
  local cached = rawget(self, "_body")
  if cached then return cached end
  if rawget(self, "_s") then return h2_body(self) end
  local c = rawget(self, "_c")
  if not c then
    if rawget(self, "_consumed") then error("the body was already read by body_reader()", 2) end
    return ""
  end
  return whole_body(self, done_with, self.keepalive, c.hc:read_body("all", self._max_body, self:_body_timeout()))
end

--- Iterates over the body's chunks in constant memory; raises on an I/O error.
function methods:body_reader()
  local c = rawget(self, "_c")
  rawset(self, "_consumed", true)
  if rawget(self, "_s") then return chunk_reader(self, h2_read_chunk, h2_done, true) end
  if not c then return function() return nil end end
  return chunk_reader(self, h1_read_chunk, done_with, self.keepalive)
end

--- Every value of a header field, in order.
function methods:header_list(name)
  local lname = name:lower()
  local multi = rawget(self, "_multi")
  local list = multi and multi[lname]
  if list then return table.move(list, 1, #list, 1, {}) end
  local v = self.headers[lname]
  return v and { v } or {}
end

--- Drops the response: an unread body closes the connection instead of returning it.
function methods:close()
  if rawget(self, "_s") then
    local done = rawget(self, "_s"):state()
    h2_done(self, done)
    return
  end
  local c = rawget(self, "_c")
  if not c then return end
  local _, msg_done = c.hc:state()
  done_with(self, msg_done and self.keepalive)
end

Response.__close = methods.close
Response.__gc = function(self)
  local c = rawget(self, "_c")
  if c and not c.released then
    -- collected with its body unread: the connection cannot be reused
    c.released = true
    c.pool.active = c.pool.active - 1
    c.sock:close()
    wake_waiter(c.pool)
  end
end

-- ---------------------------------------------------------------------------------------
-- requests

local no_headers = setmetatable({}, { __newindex = function() error("read-only") end })

-- Fills `flat` with the request's header pairs; returns their count and whether the caller
-- set a content-length. (Per request: no closures, no tables unless headers were given.)
local function header_pairs(o, u, self, flat)
  local n = 0
  local h = o.headers
  local seen = no_headers
  if h ~= nil then
    if type(h) ~= "table" then argerror(1, "request", "option 'headers' must be a table", 4) end
    seen = {}
    for k, v in pairs(h) do
      if type(k) ~= "string" then argerror(1, "request", "header names must be strings", 4) end
      if type(v) == "table" then
        for _, item in ipairs(v) do
          flat[2 * n + 1], flat[2 * n + 2] = k, tostring(item)
          n = n + 1
        end
      elseif v ~= false then
        flat[2 * n + 1], flat[2 * n + 2] = k, tostring(v)
        n = n + 1
      end
      seen[k:lower()] = true
    end
  end
  if not seen["user-agent"] and self.user_agent then
    flat[2 * n + 1], flat[2 * n + 2] = "User-Agent", self.user_agent
    n = n + 1
  end
  if o._decompress and not seen["accept-encoding"] then
    flat[2 * n + 1], flat[2 * n + 2] = "Accept-Encoding", "gzip, deflate"
    n = n + 1
  end
  if u.user and not seen.authorization then
    flat[2 * n + 1], flat[2 * n + 2] = "Authorization", "Basic " .. base64(u.user .. ":" .. (u.password or ""))
    n = n + 1
  end
  return n, seen["content-length"] or seen["transfer-encoding"]
end

-- Every value a caller gave for the header field `lname`, as strings.
local function values_of(headers, lname)
  local list = {}
  for k, v in pairs(headers) do
    if k:lower() == lname then
      if type(v) == "table" then
        for _, item in ipairs(v) do list[#list + 1] = tostring(item) end
      elseif v ~= false then
        list[#list + 1] = tostring(v)
      end
    end
  end
  return list
end

-- A caller's own Content-Length or Transfer-Encoding must frame the body we send: otherwise
-- the server reads part of the body, or the next request, as a request of its own (a
-- smuggling hazard for apps that forward headers). Raises naming the option; returns the
-- Content-Length a body function must produce, if one was given.
local function check_framing(headers, length)
  local cl, te = values_of(headers, "content-length"), values_of(headers, "transfer-encoding")
  local function bad(msg) argerror(1, "request", "option 'headers': " .. msg, 5) end
  if #cl > 0 and #te > 0 then bad("both Content-Length and Transfer-Encoding") end
  if #cl > 1 or #te > 1 then bad("Content-Length and Transfer-Encoding may be given once") end
  if cl[1] then
    local n = cl[1]:match("^%d+$") and math.tointeger(tonumber(cl[1]))
    if not n then bad("Content-Length '" .. cl[1] .. "' is not a decimal number") end
    if length == -1 then return n end   -- a body function: send_body counts
    local want = length >= 0 and length or 0
    if cl[1] ~= tostring(want) then
      bad("Content-Length " .. cl[1] .. " does not match the body's length " .. want)
    end
  elseif te[1] then
    if length ~= -1 then bad("Transfer-Encoding needs a body function (the body goes chunked)") end
    local last = te[1]:lower():match("([^,]*)$"):match("^%s*(.-)%s*$")
    if last ~= "chunked" then bad("Transfer-Encoding '" .. te[1] .. "' does not end in chunked") end
  end
  return nil
end

local function body_length(body)
  local tb = type(body)
  if body == nil then return -2 end
  if tb == "string" then return #body end
  if tb == "table" then
    local n = 0
    for i, piece in ipairs(body) do
      if type(piece) ~= "string" then argerror(1, "request", "body piece #" .. i .. " is not a string", 5) end
      n = n + #piece
    end
    return n
  end
  if tb == "function" then return -1 end
  argerror(1, "request", "option 'body' must be a string, a table of strings or a function", 5)
end

-- Sends the head and the body; a function body goes chunked, or raw when the caller gave
-- a content-length (`raw`: that length, which the function must produce exactly).
local function send_body(sock, head, body, raw)
  local tb = type(body)
  if body == nil then return sock:write(head) end
  if tb == "string" then return sock:write(head, body) end
  if tb == "table" then return sock:write(head, table.unpack(body)) end
  local ok, err, code = sock:write(head)
  if not ok then return nil, err, code end
  while true do
    local chunk = body()
    if chunk == nil then
      if raw then
        if raw > 0 then
          return nil, "the body function ended " .. raw .. " bytes short of its Content-Length", "EINVAL"
        end
        return true
      end
      return sock:write("0\r\n\r\n")
    end
    if type(chunk) ~= "string" then error("body function returned a " .. type(chunk), 0) end
    if chunk ~= "" then
      if raw then
        -- what goes past the Content-Length would reach the server as another request
        if #chunk > raw then return nil, "the body function gave more than its Content-Length", "EINVAL" end
        raw = raw - #chunk
        ok, err, code = sock:write(chunk)
      else
        ok, err, code = sock:write(("%x\r\n"):format(#chunk), chunk, "\r\n")
      end
      if not ok then return nil, err, code end
    end
  end
end

local function no_proxy_match(host, list)
  for entry in list:gmatch("[^,%s]+") do
    if entry == "*" then return true end
    entry = entry:gsub("^%.", ""):lower()
    if host == entry or host:sub(-#entry - 1) == "." .. entry then return true end
  end
  return false
end

-- The proxy settings of the environment, read once per client. An https URL takes
-- https_proxy only, never http_proxy (as curl, Go and Python do: credentials meant for one
-- proxy are not sent to another). Under CGI (REQUEST_METHOD set) HTTP_PROXY may come from a
-- request's "Proxy:" header (httpoxy, CVE-2016-5385): then only the lower-case http_proxy
-- counts, as in curl and Go.
local function env_proxies()
  local http = os.getenv("http_proxy")
  if not http and not os.getenv("REQUEST_METHOD") then http = os.getenv("HTTP_PROXY") end
  return {
    http = http,
    https = os.getenv("https_proxy") or os.getenv("HTTPS_PROXY"),
    no = os.getenv("no_proxy") or os.getenv("NO_PROXY"),
  }
end

-- The proxy URL for u, from the option or the environment (http_proxy or https_proxy by
-- the URL's scheme, no_proxy), or nil, err. Only an http:// proxy is spoken to: an https://
-- one (TLS to the proxy) or a SOCKS one is refused, never sent plaintext HTTP and its
-- Proxy-Authorization in the clear.
local function proxy_for(self, o, u)
  local p = o.proxy
  if p == false or o.unix then return nil end    -- (a Unix socket is reached directly)
  if p == nil then
    local env = self._env
    if u.scheme == "https" then p = env.https else p = env.http end
    if p and env.no and no_proxy_match(u.host, env.no) then p = nil end
  end
  if p == nil or p == "" then return nil end
  if type(p) ~= "string" then error("bad option 'proxy' (string or false expected, got " .. type(p) .. ")", 0) end
  local pu, err = parse_cached(p)
  if not pu then return nil, "bad proxy: " .. err end  -- (url.parse hides the password)
  if pu.scheme ~= "http" then
    return nil, "unsupported proxy scheme '" .. pu.scheme .. "' (only http:// proxies are supported)"
  end
  return pu
end


-- ---------------------------------------------------------------------------------------
-- HTTP/2: one connection per origin, shared by every task (nghttp2 queues requests past the
-- server's MAX_CONCURRENT_STREAMS until a stream is free)

-- A TCP connection to the origin or a proxy, bound to the client's local_host when given.
local function tcp_connect(self, host, port)
  return mw.tcp.connect(host, port, { timeout = self.connect_timeout, local_host = self.local_host })
end

local function h2_pool(self, key)
  local p = self._h2[key]
  if not p then
    p = { waiters = { first = 1, last = 0 }, used = 0 }
    self._h2[key] = p
  end
  return p
end

local function wake_all(p)
  local w = p.waiters
  while w.first <= w.last do
    local t = w[w.first]
    w[w.first] = nil
    w.first = w.first + 1
    if t then unpark(t, true) end
  end
end

-- The origin's HTTP/2 connection: the pooled one while it takes requests, else a new one
-- (one task connects, the others wait for it). nil, sock, "h1" when the server chose
-- HTTP/1.1 by ALPN (the socket is handed over to the HTTP/1.1 pool).
local function h2_checkout(self, key, connect, alpn)
  local p = h2_pool(self, key)
  while true do
    if p.h1 then return nil, nil, "h1" end
    local hc = p.conn
    if hc then
      local now = mw.now()
      -- a connection that sat idle is polled first: a GOAWAY or a close it got meanwhile;
      -- one idle for idle_timeout is closed instead (as an HTTP/1.1 one is: the server may
      -- be about to drop it, and a NAT or a proxy may have forgotten it already)
      local ok = hc:idle() < self.idle_timeout and hc:usable() and (now - p.used < 1 or hc:poll())
      if ok then
        p.used = now
        return hc
      end
      p.conn = nil
      hc:retire()   -- closed now, or once the requests still on it end
    elseif not p.connecting then
      p.connecting = true
      -- a connect that raises (a bad option) must not leave the origin marked as
      -- connecting: the tasks waiting for it, and every later request, would wait for good
      local done, sock, err, code = pcall(connect)
      p.connecting = false
      if not done then
        wake_all(p)
        error(sock, 0)
      end
      if not sock then
        wake_all(p)
        return nil, err, code
      end
      if alpn then
        local info = sock:tls_info()
        if not (info and info.alpn == "h2") then
          p.h1 = true      -- this origin speaks HTTP/1.1: later requests go there at once
          wake_all(p)
          return nil, sock, "h1"
        end
      end
      hc = h2_client(sock, self._h2opts)
      p.conn, p.used = hc, mw.now()
      self._h2count = self._h2count + 1
      wake_all(p)
      return hc
    else
      local ok, err, code = wait_turn(p)
      if not ok then return nil, err, code end
    end
  end
end

-- Request trailers as a flat list (the option: a table, or a function called once the body
-- has been sent that returns one). Raises on a field HTTP/1.1 would refuse in a head (a
-- name that is no token, CR, LF or NUL in a value), with the same message.
local function trailer_pairs(tr)
  if type(tr) == "function" then tr = tr() end
  if tr == nil then return nil, 0 end
  if type(tr) ~= "table" then error("bad option 'trailers' (table or function expected)", 0) end
  local flat, n = {}, 0
  for k, v in pairs(tr) do
    flat[2 * n + 1], flat[2 * n + 2] = tostring(k), tostring(v)
    n = n + 1
  end
  check_fields(flat, n)
  return flat, n
end

-- Sends the request on hc: returns the stream or nil, err, code. trailers: nil, a flat list
-- (the option's table, made and checked by exchange) or the option's function.
local function h2_send(hc, method, scheme, authority, target, flat, nh, body, trailers)
  local tb = type(body)
  if tb == "table" then body, tb = table.concat(body), "string" end
  if tb ~= "function" and trailers == nil then
    return hc:request(method, scheme, authority, target, flat, nh, body)
  end
  local st, err, code = hc:request(method, scheme, authority, target, flat, nh, tb == "string" and body or nil, true)
  if not st then return nil, err, code end
  if tb == "function" then
    while true do
      local chunk = body()
      if chunk == nil then break end
      if type(chunk) ~= "string" then error("body function returned a " .. type(chunk), 0) end
      if chunk ~= "" then
        local ok
        ok, err, code = st:write(chunk)
        if not ok then return nil, err, code, st end
      end
    end
  end
  -- (a function that raises or gives a bad field raises here, and the stream, sent but for
  -- its end, is reset)
  local tflat, tn = trailers, 0
  if type(trailers) == "function" then
    local done
    done, tflat, tn = pcall(trailer_pairs, trailers)
    if not done then
      st:reset()
      error(tflat, 0)
    end
  elseif trailers then
    tn = #trailers // 2
  end
  local ok
  if tn > 0 then
    ok, err, code = st:set_trailers(tflat, tn)
    if not ok then st:reset() return nil, err, code end    -- no response to wait for
  end
  ok, err, code = st:write("", true)
  if not ok then return nil, err, code, st end
  return st
end

-- One HTTP/2 exchange: the response (head read) or nil, err, code; nil, sock, "h1" when
-- the origin turned out to speak HTTP/1.1.
local function h2_exchange(self, o, key, connect, alpn, u, method, target, flat, nh, body, trailers)
  local authority = u.authority
  local hosts = o.headers and values_of(o.headers, "host")
  if hosts and hosts[1] then authority = hosts[1] end
  local replayable = type(body) ~= "function"
  local refused = 0
  for attempt = 1, 4 do
    local hc, err, code = h2_checkout(self, key, connect, alpn)
    if not hc then return nil, err, code end
    local st, status, headers, multi, st2
    if replayable then
      st, err, code, st2 = h2_send(hc, method, u.scheme, authority, target, flat, nh, body, trailers)
    else
      local done
      done, st, err, code, st2 = pcall(h2_send, hc, method, u.scheme, authority, target, flat, nh, body, trailers)
      if not done then error(st, 0) end
    end
    if st2 and (code == "cancelled" or code == "timeout") then
      -- the task was cancelled or ran out of time while the body went out: that is the
      -- answer (waiting for a head would block to the deadline, or turn a cancelled
      -- request into a success); the server stops the request
      st2:reset()
      return nil, err, code
    end
    -- a write that failed for the stream's or the connection's sake: the head says why
    -- (a response that came early, "refused", "reset", the connection's error)
    st = st or st2
    if st then
      status, headers, multi = st:head()
      if status then
        local res = setmetatable({ status = status, reason = "", version = "2",
          headers = setmetatable(headers, headers_mt), _multi = multi, _s = st, _client = self,
          keepalive = true }, Response)
        return res
      end
      err, code = headers, multi
      if code ~= "refused" then st:reset() end
    end
    -- a request the server did not process: once more (on a new connection after a GOAWAY)
    local retry = replayable and attempt < 4 and
      ((code == "refused" and (refused < 1 or not hc:usable())) or code == "goaway")
    if code == "refused" then refused = refused + (hc:usable() and 1 or 0) end
    if not retry then return nil, err, code end
  end
end

-- One exchange: returns the response (head read) or nil, err, code.
local function exchange(self, o, u, method, body)
  local proxy, perr = proxy_for(self, o, u)
  if perr then return nil, perr, "EINVAL" end
  if u.scheme ~= "http" and u.scheme ~= "https" then
    return nil, "unsupported URL scheme '" .. u.scheme .. "'", "EINVAL"
  end
  local https = u.scheme == "https"
  local tlsopt = o.tls or self.tls or true
  local key, connect, target
  local http2 = o.http2
  if http2 == nil then http2 = self.http2 end
  -- h2 by ALPN on https (unless http2 = false); by prior knowledge on http when asked
  -- (not through a forward proxy, which speaks HTTP/1.1 to us)
  local alpn = https and http2 ~= false
  local use_h2 = alpn or (http2 == true and not proxy)
  -- the connect function for an origin (and proxy / TLS settings) is made once, then reused
  -- (the plain case is keyed by the parsed URL itself, which parse_cached() reuses)
  local simple = not o.unix and not proxy and not o.tls and o.http2 == nil
  local ckey = simple and u or (u.scheme .. "|" .. u.host .. "|" .. u.port .. "|" .. tostring(o.unix) .. "|" ..
    (proxy and (proxy.host .. ":" .. proxy.port .. ":" .. tostring(proxy.user)) or "") .. "|" ..
    (https and tostring(tlsopt) or "") .. "|" .. tostring(alpn))
  local cached = self._connectors[ckey]
  if cached then
    key, connect = cached.key, cached.connect
    target = (proxy and not https and not o.unix) and (u.scheme .. "://" .. u.authority .. u.target) or u.target
  elseif https then
    local tls = require "moonwire.tls"
    local topt = tlsopt
    if tlsopt ~= true and type(tlsopt) ~= "table" and not tls.is_context(tlsopt) then
      -- (not replaced by the ALPN table below: a path given as `tls` is no CA file)
      error("bad option 'tls' (true, table or context expected, got " .. type(tlsopt) .. ")", 0)
    end
    if alpn and not tls.is_context(tlsopt) then
      -- offer h2 and http/1.1 by ALPN
      topt = {}
      if type(tlsopt) == "table" then for k, v in pairs(tlsopt) do topt[k] = v end end
      topt.alpn = topt.alpn or { "h2", "http/1.1" }
    end
    local ctx = tls.client_context(topt)
    local vhost = type(tlsopt) == "table" and tlsopt.host or u.host
    local function handshake(sock)
      local ok, err, code = sock:starttls(ctx, { host = vhost, timeout = self.connect_timeout })
      if not ok then sock:close() return nil, err, code end
      return sock
    end
    -- a pooled connection is only reused under the same TLS settings (verification!)
    key = "https://" .. u.host .. ":" .. u.port .. (o.unix and ("@" .. o.unix) or "") .. "|" .. tostring(ctx)
      .. "|" .. tostring(vhost)
    if o.unix then
      connect = function()
        local sock, err, code = mw.unix.connect(o.unix, { timeout = self.connect_timeout })
        if not sock then return nil, err, code end
        return handshake(sock)
      end
    elseif proxy then
      -- a tunnel through the proxy: CONNECT, then TLS end to end
      key = key .. "|" .. proxy.host .. ":" .. proxy.port
      connect = function()
        local sock, err, code = tcp_connect(self, proxy.host, proxy.port)
        if not sock then return nil, err, code end
        local flat, n = {}, 0
        if proxy.user then
          flat[1], flat[2] = "Proxy-Authorization", "Basic " .. base64(proxy.user .. ":" .. (proxy.password or ""))
          n = 1
        end
        local hp = (u.ipv6 and ("[" .. u.host .. "]") or u.host) .. ":" .. u.port
        local ok
        ok, err, code = sock:write(request_head("CONNECT", hp, hp, flat, n, -2))
        if not ok then sock:close() return nil, err, code end
        local hc = http_conn(sock, self._limits, {}, true)
        local r
        r, err, code = hc:read_request(-1, -1, true)
        if not r then sock:close() return nil, "proxy CONNECT: " .. tostring(err), code end
        if r.status ~= 200 then
          sock:close()
          return nil, "proxy CONNECT answered " .. r.status, "proxy"
        end
        -- the origin speaks first only after our ClientHello: bytes already here came from
        -- the proxy (or whoever is on the plaintext leg) and must never pass for TLS data
        if sock:buffered() > 0 then
          sock:close()
          return nil, "proxy CONNECT: the proxy sent bytes after its 200 response", "proxy"
        end
        return handshake(sock)
      end
    else
      connect = function()
        local sock, err, code = tcp_connect(self, u.host, u.port)
        if not sock then return nil, err, code end
        return handshake(sock)
      end
    end
    target = u.target
  elseif o.unix then
    key = "unix:" .. o.unix
    connect = function() return mw.unix.connect(o.unix, { timeout = self.connect_timeout }) end
    target = u.target
  elseif proxy then
    key = "proxy:" .. proxy.host .. ":" .. proxy.port
    connect = function() return tcp_connect(self, proxy.host, proxy.port) end
    target = u.scheme .. "://" .. u.authority .. u.target
  else
    key = u.scheme .. "://" .. u.host .. ":" .. u.port
    connect = function() return tcp_connect(self, u.host, u.port) end
    target = u.target
  end
  if not cached then
    if self._nconnectors >= 256 then self._connectors, self._nconnectors = {}, 0 end
    self._connectors[ckey] = { key = key, connect = connect }
    self._nconnectors = self._nconnectors + 1
  end
  local flat = self._flat   -- scratch: request_head() copies it at once
  local nh, framed = header_pairs(o, u, self, flat)
  if proxy and proxy.user and not https then
    flat[2 * nh + 1], flat[2 * nh + 2] = "Proxy-Authorization",
      "Basic " .. base64(proxy.user .. ":" .. (proxy.password or ""))
    nh = nh + 1
  end
  local length = body_length(body)
  local raw = framed and check_framing(o.headers, length)
  -- trailers given as a table are made a flat list and checked here, as the head is, before
  -- anything is sent and whatever the version (only HTTP/2 sends them): a bad one raises
  -- alike on both
  local trailers = o.trailers
  if type(trailers) == "table" then trailers = trailer_pairs(trailers) end
  if use_h2 then
    -- the scratch list is the client's, shared by its tasks: an HTTP/2 exchange can wait
    -- (for the connection another task is opening, for a free stream, for a retry, for
    -- ALPN to pick HTTP/1.1) before it sends the head, and meanwhile another task's request
    -- would refill the scratch list; this request keeps a list of its own
    flat = table.move(flat, 1, 2 * nh, 1, {})
    if length >= 0 and not framed then
      flat[2 * nh + 1], flat[2 * nh + 2] = "content-length", tostring(length)
      nh = nh + 1
    end
    local res, err, code = h2_exchange(self, o, key, connect, alpn, u, method, target, flat, nh, body, trailers)
    if res or code ~= "h1" then return res, err, code end
    -- the server chose HTTP/1.1: its socket is the first connection of the HTTP/1.1 pool
    if err then
      local given = err
      local plain = connect
      connect = function()
        if given then
          local sock = given
          given = nil
          return sock
        end
        return plain()
      end
    end
    if length >= 0 and not framed then nh = nh - 1 end
  end
  local head = request_head(method, target, u.authority, flat, nh, length)
  local replayable = type(body) ~= "function"
  for attempt = 1, 2 do
    local c, err, code = checkout(self, key, connect, attempt > 1)
    if not c then return nil, err, code end
    c.client = self
    local ok
    if replayable then
      ok, err, code = send_body(c.sock, head, body, raw)
    else
      -- a body function may raise: the connection goes back (closed) before the error does
      local done
      done, ok, err, code = pcall(send_body, c.sock, head, body, raw)
      if not done then
        release(self, c, false)
        error(ok, 0)
      end
    end
    local res, werr, wcode
    if not ok and answered_early[code] then
      -- RFC 9112 §9.6: a server may answer (413, 401) before it has read the body and close;
      -- the write then fails, but the answer came first: read it (the socket is dead, so the
      -- read ends at once, with the answer or without), else the write's error stands
      ok, werr, wcode = true, err, code
    end
    if ok then
      -- interim responses (100 Continue, 103 Early Hints) are skipped, but not without end:
      -- a server sending them forever would otherwise keep the request going
      local interim = 0
      repeat
        res, err, code = c.hc:read_request(-1, -1, method == "HEAD")
        if res and res.status >= 100 and res.status < 200 and res.status ~= 101 then
          interim = interim + 1
          if interim > MAX_INTERIM then
            res, err, code = nil, "too many interim (1xx) responses", "http"
          end
        end
      until not res or res.status < 100 or res.status >= 200 or res.status == 101
      if werr then
        if res and res.status >= 200 then
          res.keepalive = false   -- the request was not sent whole: never reused
        else
          res, err, code = nil, werr, wcode
        end
      end
    end
    if res and res.status == 101 and not (o.headers and values_of(o.headers, "upgrade")[1]) then
      -- a switch nobody asked for (RFC 9110 §15.2.2: only in answer to an Upgrade): what
      -- follows is no HTTP we could read, and no response to this request
      release(self, c, false)
      return nil, "a 101 Switching Protocols answered a request that asked for no upgrade", "http"
    end
    if res then
      -- a 101 hands the connection to another protocol: never back to the pool
      if res.status == 101 then res.keepalive = false end
      rawset(res, "_c", c)
      return res
    end
    release(self, c, false)
    -- a pooled connection the server closed meanwhile: try once more on a fresh one
    local stale = c.reused and (code == "closed" or code == "ECONNRESET" or code == "EPIPE")
    if not (stale and attempt == 1 and replayable and idempotent[method]) then
      return nil, err, code
    end
  end
end

local redirect_codes = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }
-- (and Host: a caller's Host names the first origin, not the one redirected to)
local credential_headers = { authorization = true, cookie = true, ["proxy-authorization"] = true, host = true }

local function origin_of(u) return u.scheme .. "://" .. u.host .. ":" .. u.port end

-- The headers without Content-Length and Transfer-Encoding (a redirect that drops the body).
local function without_framing(headers)
  if not headers then return nil end
  local out = {}
  for k, v in pairs(headers) do
    local lk = k:lower()
    if lk ~= "content-length" and lk ~= "transfer-encoding" then out[k] = v end
  end
  return out
end

local function strip_credentials(headers)
  if not headers then return nil end
  local out = {}
  for k, v in pairs(headers) do
    if not credential_headers[k:lower()] then out[k] = v end
  end
  return out
end

--- client:request{ method, url, headers, body, timeout, redirects, decompress, unix, proxy, max_body }
function Client:request(o)
  if type(o) ~= "table" then argerror(1, "request", "table expected, got " .. type(o)) end
  if type(o.url) ~= "string" then argerror(1, "request", "option 'url' must be a string") end
  local method = o.method or (o.body ~= nil and "POST" or "GET")
  if type(method) ~= "string" then argerror(1, "request", "option 'method' must be a string") end
  method = upper[method] or method:upper()
  if o.timeout ~= nil or o.redirects ~= nil or o.max_body ~= nil or o.decompress ~= nil or o.http2 ~= nil then
    for _, k in ipairs { "timeout", "redirects", "max_body", "decompress", "http2" } do
      checked("request", k, o[k], 3)
    end
  end
  local u, uerr = parse_cached(o.url)
  if not u then return nil, uerr, "EINVAL" end
  local max_redirects = o.redirects
  if max_redirects == nil then max_redirects = self.redirects end
  if max_redirects == false then max_redirects = 0 end
  local timeout = tonumber(o.timeout) or self.timeout
  local deadline = mw.now() + timeout
  local opts = {
    headers = o.headers, unix = o.unix, proxy = o.proxy, tls = o.tls, http2 = o.http2, trailers = o.trailers,
    _decompress = o.decompress == nil and self.decompress or o.decompress,
  }
  local body = o.body
  local visited   -- made on the first redirect
  local current_url = o.url
  for hop = 0, max_redirects do
    -- one deadline over every hop: each gets what the ones before it left
    local left = deadline - mw.now()
    if left <= 0 then return nil, "timeout", "timeout" end
    local res, err, code = mw.timeout(left, exchange, self, opts, u, method, body)
    if not res then return nil, err, code end
    rawset(res, "url", (current_url:gsub("^(%a[%w+.-]*://)[^/?#]*@", "%1")))  -- (no credentials)
    rawset(res, "_decompress", opts._decompress)
    rawset(res, "_max_body", o.max_body or self.max_body)
    rawset(res, "_deadline", deadline)
    rawset(res, "_read_timeout", self.read_timeout or timeout)
    finished(res)
    if not redirect_codes[res.status] or max_redirects <= 0 then return res end
    local loc = rawget(res.headers, "location")
    if not loc then return res end
    if hop == max_redirects then
      res:close()
      return nil, "too many redirects (" .. max_redirects .. ")", "redirect"
    end
    local keep_method = res.status == 307 or res.status == 308
    if keep_method and type(body) == "function" then return res end  -- cannot replay the body
    -- let the redirect's own (small) body go so its connection can be reused
    if not res:body() then res:close() end
    local next_url = url.resolve(current_url, loc)
    local nu, nerr = url.parse(next_url)   -- a private copy: it may be changed below
    if not nu then return nil, "bad redirect location: " .. nerr, "redirect" end
    if nu.scheme ~= "http" and nu.scheme ~= "https" then
      return nil, "redirect to an unsupported scheme: " .. nu.scheme, "redirect"
    end
    if not keep_method and method ~= "GET" and method ~= "HEAD" then
      method, body = "GET", nil
      opts.headers = without_framing(opts.headers)
    end
    if origin_of(nu) ~= origin_of(u) then
      opts.headers = strip_credentials(opts.headers)
      nu.user, nu.password = nil, nil
    elseif not nu.user then
      nu.user, nu.password = u.user, u.password   -- same origin: same credentials
    end
    visited = visited or { [(o.method or (o.body ~= nil and "POST" or "GET")):upper() .. " " .. o.url] = true }
    local k = method .. " " .. next_url
    if visited[k] then return nil, "redirect loop at " .. next_url, "redirect" end
    visited[k] = true
    u, current_url = nu, next_url
  end
end

function Client:get(target, opts)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.url, o.method = target, "GET"
  return self:request(o)
end

function Client:post(target, body, opts)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.url, o.method, o.body = target, "POST", body
  return self:request(o)
end

--- Closes every idle connection; later requests open new ones.
function Client:close()
  for _, p in pairs(self._pools) do
    for _, c in ipairs(p.idle) do c.sock:close() end
    p.idle = {}
  end
  for _, p in pairs(self._h2) do
    if p.conn then p.conn:close() end
    p.conn = nil
  end
end

--- Idle and active connection counts (for tests and monitoring).
function Client:stats()
  local idle, active = 0, 0
  for _, p in pairs(self._pools) do
    idle = idle + #p.idle
    active = active + p.active
  end
  if self._h2count == 0 then return { idle = idle, active = active } end
  local h2, streams = 0, 0
  for _, p in pairs(self._h2) do
    if p.conn and p.conn:usable() then
      h2 = h2 + 1
      streams = streams + p.conn:streams()
    end
  end
  -- once HTTP/2 was used: its usable connections, their open requests, connections opened
  return { idle = idle, active = active, h2 = h2, h2_streams = streams, h2_opened = self._h2count }
end

function M.client(opts)
  if opts ~= nil and type(opts) ~= "table" then argerror(1, "client", "table expected, got " .. type(opts)) end
  local self = setmetatable({ _pools = {} }, Client)
  for k, v in pairs(defaults) do self[k] = v end
  for k, v in pairs(opts or {}) do
    if defaults[k] == nil and k ~= "read_timeout" and k ~= "tls" and k ~= "http2" and k ~= "local_host" then
      argerror(1, "client", "unknown option '" .. tostring(k) .. "'")
    end
    self[k] = checked("client", k, v, 2)
  end
  if self.local_host ~= nil and type(self.local_host) ~= "string" then
    argerror(1, "client", "bad option 'local_host' (string expected, got " .. type(self.local_host) .. ")")
  end
  self._limits = { request_line = 8192, head = self.max_head, headers = self.max_headers }
  self._env = env_proxies()
  self._connectors, self._nconnectors = {}, 0
  self._flat = {}
  self._h2, self._h2count = {}, 0
  self._h2opts = { stream_window = self.h2_stream_window, conn_window = self.h2_conn_window,
    header_fields = self.max_headers, header_bytes = self.max_head }
  return self
end

local default_client
local function default() default_client = default_client or M.client() return default_client end
M.default = default

function M.request(o) return default():request(o) end
function M.get(u, o) return default():get(u, o) end
function M.post(u, b, o) return default():post(u, b, o) end

return M
