--- The response object handed to HTTP handlers.
-- Headers are kept as a flat array {name, value, ...} that the C core turns into the head
-- bytes (status line, Server, Date, headers, Content-Length) for one gathered write.
local core = require "moonwire.core"

local http_head, http_send, value_ok, gzip = core.http_head, core.http_send, core.http_value_ok, core.gzip
local http_bodyless = core.http_bodyless
local type, error = type, error
local mime_ok, mime = pcall(require, "moonwire.http.mime")

local Response = {}
Response.__index = Response

-- (level: 4 from send_lua and header_lua, which run under a C function)
local function argerror(n, fname, msg, level)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), level or 3)
end

-- A response is one table. Its fields sit in the array part (a constructor fills that
-- without a hash insertion per field, which is most of what making a table costs Lua), and
-- its header list follows them: name, value pairs from index HBASE on. CLOSE says the
-- connection closes after it, UPGRADED that the handler took the connection over (then CLOSE
-- is set too: the server reads CLOSE after every request, UPGRADED only then). `sent` is
-- its one named field (public); the rarely changed _touched and _mode are named and
-- default from the class. server.lua and websocket.lua use the same slots. (One constant
-- per declaration: Lua folds only the last name of `local a <const>, b <const> = 1, 2`; the
-- others become upvalues of every function that uses them, an extra instruction per access.)
local SRV <const> = 1
local REQ <const> = 2
local SOCK <const> = 3
local NH <const> = 4
local FIN <const> = 5
local BYTES <const> = 6
local STATUS <const> = 7
local CLOSE <const> = 8
local UPGRADED <const> = 9
local HBASE <const> = 10
-- the request's parsed fields (request.lua: Request.slots)
local CONN <const> = 1
local R_METHOD <const> = 6
local R_VERSION <const> = 8
local R_KEEPALIVE <const> = 10
Response.slots = { SRV = SRV, REQ = REQ, SOCK = SOCK, NH = NH, FIN = FIN, BYTES = BYTES, STATUS = STATUS,
  CLOSE = CLOSE, UPGRADED = UPGRADED, HBASE = HBASE }

Response._touched = false
Response._mode = false
Response._trailers = false
Response._taken = false
Response._stat_range = false

-- server.lua makes each response with one table constructor (in its request loop):
-- { srv, req, sock, 0, false, 0, 200, false, false, false, false, false, false,
-- sent = false }, this metatable, and the request's slot 2 set to it. `sent` is made there
-- because set later on a table without a hash part, it would cost a rehash that counts the
-- whole array.

-- Drops every header and sets the status.
function Response:_reset(status)
  for i = HBASE, HBASE + 2 * self[NH] - 1 do self[i] = false end
  self[NH] = 0
  self[STATUS] = status
end

-- The 500 answer, whatever the handler had set (a handler that raised, a file that cannot
-- be opened); the head must not have gone out. Returns what res:send does.
function Response:_internal_error()
  self:_reset(500)
  self:header("content-type", "text/plain; charset=utf-8")
  return self:send("Internal Server Error\n")
end

function Response:status(code)
  if math.type(code) ~= "integer" or code < 100 or code > 999 then
    argerror(1, "status", "status code expected, got " .. tostring(code))
  end
  -- a 1xx is never the answer (the client would take the next response for it): 103 goes
  -- out through res:hint, 100 through req:body(), 101 through req:websocket()
  if code < 200 then argerror(1, "status", "final status expected, got " .. code .. " (1xx: see res:hint)") end
  if self.sent then error("response head already sent", 2) end
  self[STATUS] = code
  self._touched = true
  return self
end

-- The index of the first header named lname (lower case), or nil.
local function find(self, lname)
  for i = HBASE, HBASE + 2 * self[NH] - 1, 2 do
    local k = self[i]
    if k == lname or k:lower() == lname then return i end
  end
end

--- res:header(name, value): adds a header (repeatable); value nil removes every header of
-- that name. Its common case (two plain strings) runs in C (core.http_response_methods), and
-- the rest here, one call level down.
local framing = { ["content-length"] = "content-length", ["transfer-encoding"] = "transfer-encoding",
  connection = "connection" }

local function header_lua(self, name, value)
  if type(name) ~= "string" then argerror(1, "header", "string expected, got " .. type(name), 4) end
  if self.sent then error("response head already sent", 3) end
  self._touched = true
  if value == nil then
    local lname = name:lower()
    if lname == "content-length" then self._clen = nil end
    local i = find(self, lname)
    while i do
      table.remove(self, i)
      table.remove(self, i)
      self[NH] = self[NH] - 1
      i = find(self, lname)
    end
    return self
  end
  -- (explicit ranges, not %w: that one follows the C locale)
  if not name:find("^[A-Za-z0-9!#$%%&'*+%-.^_`|~]+$") then argerror(1, "header", "invalid header name", 4) end
  local tv = type(value)
  if tv == "number" then
    value = tostring(math.tointeger(value) or value)
  elseif tv ~= "string" then
    argerror(2, "header", "string expected, got " .. tv, 4)
  end
  if not value_ok(value) then argerror(2, "header", "value contains CR, LF or NUL", 4) end
  -- the framing is the server's: what the handler says of it is checked, not copied
  local lname = framing[name:lower()]
  if lname then
    if lname == "transfer-encoding" then return self end        -- chunked when streamed
    if lname == "connection" then
      if value:lower():find("%f[%w]close%f[^%w]") then self[CLOSE] = true end
      return self
    end
    -- content-length: the body's length, which res:send, res:write and res:finish hold the
    -- response to (a HEAD's, a 304's: the length the GET would have)
    if not value:find("^%d+$") or #value > 15 then
      argerror(2, "header", "content-length must be a non-negative integer, got '" .. value .. "'", 4)
    end
    header_lua(self, name, nil)
    self._clen = math.tointeger(tonumber(value))
  end
  local n = self[NH]
  self[HBASE + 2 * n] = name
  self[HBASE + 2 * n + 1] = value
  self[NH] = n + 1
  return self
end

--- The first value set for a header, or nil.
function Response:get_header(name)
  local i = find(self, name:lower())
  return i and self[i + 1]
end

-- Connection flags for the C head builder: 1 close, 2 keep-alive for HTTP/1.0; and 8, the
-- answer to a CONNECT (whose 2xx has no Content-Length nor Transfer-Encoding: bodyless).
-- Close when the request body is left unread and will not be drained (the request's
-- connection says: http.c's unread_closes, which res:send's C path applies too).
local function connflags(self)
  local req, srv = self[REQ], self[SRV]
  local connect = req[R_METHOD] == "CONNECT" and 8 or 0
  if not req[R_KEEPALIVE] or srv.closing or self[CLOSE] or req[CONN]:unread_closes() then
    self[CLOSE] = true
    return 1 | connect
  end
  if req[R_VERSION] == "1.0" then return 2 | connect end
  return connect
end

-- Whether the response has no body whatever is sent (a HEAD's aside): 1xx, 204, 304 and a
-- 2xx to CONNECT. The rule is http.c's (bodyless), which res:send's C path applies too;
-- h2.lua uses this one.
local function bodyless(self)
  return http_bodyless(self[STATUS], self[REQ][R_METHOD] == "CONNECT")
end
Response._bodyless = bodyless

-- Whether Accept-Encoding (RFC 9110 §12.5.3) takes gzip: its own entry's weight, else
-- that of "*"; codings are case-insensitive, "q=0", "q=0.0", "q=0.000" refuse.
local function accepts_gzip(req)
  local ae = req.headers["accept-encoding"]
  if not ae or not ae:find("[gG][zZ][iI][pP]") and not ae:find("*", 1, true) then return false end
  local gz, star
  for item in ae:lower():gmatch("[^,]+") do
    local coding, params = item:match("^%s*([^;%s]+)%s*(.*)$")
    if coding then
      local qv = params:match(";%s*q%s*=%s*([%d.]+)")
      local q = qv and (tonumber(qv) or 0) or 1
      if coding == "gzip" or coding == "x-gzip" then gz = q elseif coding == "*" then star = q end
    end
  end
  if gz then return gz > 0 end
  return star ~= nil and star > 0
end
Response._accepts_gzip = accepts_gzip

-- Whether a Vary value already names Accept-Encoding, or is "*" (varies on everything).
local function varies_on_encoding(value)
  for item in value:gmatch("[^,]+") do
    local name = item:match("^%s*(.-)%s*$"):lower()
    if name == "accept-encoding" or name == "*" then return true end
  end
  return false
end

-- Vary: Accept-Encoding (RFC 9110 §12.5.5), so that a shared cache never hands a gzip'd
-- body to a client that did not ask for one: added to the handler's own Vary (its first
-- field; "Origin" → "Origin, Accept-Encoding") unless one of its Vary fields covers it.
local function vary_on_encoding(self)
  local first
  for i = HBASE, HBASE + 2 * self[NH] - 1, 2 do
    local k = self[i]
    if k == "vary" or k:lower() == "vary" then
      if varies_on_encoding(self[i + 1]) then return end
      first = first or i
    end
  end
  if not first then
    self:header("vary", "Accept-Encoding")
  elseif self[first + 1]:find("^%s*$") then
    self[first + 1] = "Accept-Encoding"
  else
    self[first + 1] = self[first + 1] .. ", Accept-Encoding"
  end
end

-- (called for a body of at least gzip_min bytes)
local function maybe_gzip(self, body)
  if self._clen then return body end     -- the handler gave the length: the body stays as it is
  if self[STATUS] < 200 or self[STATUS] == 206 or find(self, "content-encoding") then return body end
  local ct = self:get_header("content-type")
  if not (ct and mime_ok and mime.compressible(ct)) then return body end
  -- from here the body is gzip'd or not by what the client accepts: Vary says so either way
  -- (as nginx's gzip_vary), so that a cache keeps the two answers apart
  vary_on_encoding(self)
  if not accepts_gzip(self[REQ]) then return body end
  local z = gzip(body)
  if #z >= #body then return body end
  self:header("content-encoding", "gzip")
  -- a strong ETag names one exact representation (RFC 9110 §8.8.3), and this is another one:
  -- made weak, as nginx does (a weak one stays as it is)
  for i = HBASE, HBASE + 2 * self[NH] - 1, 2 do
    local k = self[i]
    if (k == "etag" or k:lower() == "etag") and self[i + 1]:find('^%s*"') then
      self[i + 1] = "W/" .. self[i + 1]:match('^%s*(.*)$')
    end
  end
  return z
end

-- Whether Server:close cut the response's connection off after its grace period (server.lua
-- closed its socket under the handler). Then a write is a run-time failure, nil, "closed",
-- "closed" (what a write waiting on the socket got when it was closed), not misuse: the
-- handler did not close that socket (one it closed itself still raises).
local function cut(self)
  local c = self[SRV]._cut
  return c ~= nil and c[self[SOCK]] == true
end

local function write(self, ...)
  if cut(self) then
    self[CLOSE] = true
    return nil, "closed", "closed"
  end
  local ok, err, code = self[SOCK]:write(...)
  if not ok then
    self[CLOSE] = true
    return nil, err, code
  end
  return true
end

-- What the socket did not take of a response (res:send's C path, and send_lua below).
local function write_rest(self, a, b)
  if b then return write(self, a, b) end
  return write(self, a)
end

--- res:send(body): sends the whole response, head and body in one write. Its common case
-- runs in C (core.http_response_methods); the rest (compression, errors, a head too big for
-- the C path) here, one call level down.
local function send_lua(self, body)
  if self.sent then error("response already sent", 3) end
  if body == nil then
    body = ""
  elseif type(body) ~= "string" then
    argerror(1, "send", "string expected, got " .. type(body), 4)
  end
  local srv = self[SRV]
  if #body >= srv._gzip_from then body = maybe_gzip(self, body) end   -- (server.lua)
  local st, n = self[STATUS], #body
  local with_body = not bodyless(self) and self[REQ][R_METHOD] ~= "HEAD"
  local clen = self._clen
  if clen and with_body and clen ~= n then
    error(("content-length (%d) does not match the body (%d bytes)"):format(clen, n), 3)
  end
  local flags = connflags(self)
  if cut(self) then             -- (res:send's C path comes here for a closed socket)
    self.sent, self[FIN], self[BYTES], self[CLOSE] = true, true, 0, true
    return nil, "closed", "closed"
  end
  -- head and body in one write from C; what the socket did not take goes through write
  local ok, a, b = http_send(self[SOCK], st, self, self[NH], body, flags, srv.server_name, with_body, HBASE)
  self.sent, self[FIN] = true, true
  self[BYTES] = with_body and n or 0
  if ok then return true end
  if ok == nil then
    self[CLOSE] = true
    return nil, a, b
  end
  if a == nil then          -- a head too large for the fast path
    a = http_head(st, self, self[NH], n, flags, srv.server_name, HBASE)
    b = with_body and body or nil
  end
  return write_rest(self, a, b)
end

Response.send, Response.header = core.http_response_methods(send_lua, header_lua, write_rest)

-- A response whose request body failed before anything was sent: request.lua gives it this
-- metatable, so that whatever the handler answers, nothing below 400 goes out. Its answer
-- (status below 400, or none: the server's 204) is replaced by the failure's own (400 bad
-- framing, 413 too large, 408 timed out; nothing when the client is gone); a 4xx or 5xx it
-- chose stands. Either way the connection closes after it (the body was not read to its end).
-- (one class per protocol: failed_class(base, send_raw) makes it for HTTP/1.1 here and for
-- HTTP/2 in h2.lua, send_raw sending a body without these checks)
local function failure(self)
  local req = self[REQ]
  return rawget(req, "_body_error"), rawget(req, "_body_errmsg")
end

-- What a handler's send, write or sendfile gets once the server answered in its place.
local function taken(self)
  local status, msg = failure(self)
  return nil, "request body failed: " .. tostring(msg), status
end

function Response.failed_class(base, send_raw)
  local Failed = setmetatable({}, { __index = base })
  Failed.__index = Failed
  Failed.Failed = Failed

  -- The failure's answer in place of the handler's (when `force`, or when the handler's
  -- status is below 400): true when done so (sent, or nothing to send), false when the
  -- handler's answer stands.
  local function take_over(self, force)
    self[CLOSE] = true
    if not force and self[STATUS] >= 400 then return false end
    self._taken = true
    local status, msg = failure(self)
    if math.type(status) ~= "integer" then      -- the client is gone: nothing to answer
      self.sent, self[FIN], self[BYTES] = true, true, 0
      return true
    end
    self:_reset(status)
    self:header("content-type", "text/plain; charset=utf-8")
    send_raw(self, tostring(msg) .. "\n")
    return true
  end

  function Failed:send(body)
    if self._taken or (not self.sent and take_over(self)) then return taken(self) end
    return send_raw(self, body)
  end

  function Failed:write(chunk)
    if self._taken or (not self.sent and take_over(self)) then return taken(self) end
    return base.write(self, chunk)
  end

  function Failed:sendfile(path, offset, length)
    if self._taken or (not self.sent and take_over(self)) then return taken(self) end
    return base.sendfile(self, path, offset, length)
  end

  -- (server.lua) a handler raised after its body failed: the failure's answer, not a 500
  function Failed:_answer_failure()
    if not self.sent then take_over(self, true) end
    self[CLOSE] = true
  end
  return Failed
end

Response.Failed = Response.failed_class(Response, send_lua)
Response._maybe_gzip = maybe_gzip

-- Streaming: chunked for HTTP/1.1 without a known length; close-delimited for 1.0.
local function start_stream(self)
  local length = self._clen
  local flags = connflags(self)
  if length then
    self._mode = "length"
  elseif self[REQ][R_VERSION] == "1.0" then
    self._mode = "raw"
    self[CLOSE] = true
    flags = 1
    length = -2
  else
    self._mode = "chunked"
    length = -1
  end
  local head = http_head(self[STATUS], self, self[NH], length, flags, self[SRV].server_name, HBASE)
  self.sent = true
  if self[REQ][R_METHOD] == "HEAD" then self._mode = "none" end
  return write(self, head)
end

-- A streamed body against the content-length the handler set (both versions): a piece that
-- would pass it raises (level: res:write's caller); the end before it is short.
local function past_length(self, chunk)
  local clen = self._clen
  if clen and self[BYTES] + #chunk > clen then
    error(("res:write past the content-length (%d bytes, %d written)"):format(clen, self[BYTES]), 3)
  end
end

local function short_of_length(self)
  local clen = self._clen
  return clen ~= nil and self._mode ~= "none" and self[BYTES] < clen
end
Response._past_length, Response._short_of_length = past_length, short_of_length

-- res:write's argument as a string (a number is turned into one); raises for anything else
-- (level: res:write's caller). HTTP/2's res:write (h2.lua) takes it the same way.
local function write_arg(chunk)
  if type(chunk) == "string" then return chunk end
  if type(chunk) == "number" then return tostring(chunk) end
  argerror(1, "write", "string expected, got " .. type(chunk), 4)
end
Response._write_arg = write_arg
Response._argerror = argerror

--- Streams a piece of the body (backpressure: waits while the client is slow).
function Response:write(chunk)
  chunk = write_arg(chunk)
  if self._mode == "none" then return true end      -- HEAD, or a status without a body
  if self[FIN] then error("response already finished", 2) end
  if not self.sent then
    if bodyless(self) then
      -- a response that has no body (RFC 9110 §6.4.1, §9.3.6): the head alone; what is
      -- written is dropped
      self._mode = "none"
      return self:send("")
    end
    local ok, err, code = start_stream(self)
    if not ok then return nil, err, code end
  end
  if #chunk == 0 or self._mode == "none" then return true end
  past_length(self, chunk)
  if cut(self) then
    self[CLOSE] = true
    return nil, "closed", "closed"
  end
  local ok, err, code, sent, size
  if self._mode == "chunked" then
    size = ("%x\r\n"):format(#chunk)
    ok, err, code, sent = self[SOCK]:write(size, chunk, "\r\n")
  else
    ok, err, code, sent = self[SOCK]:write(chunk)
  end
  if ok then
    self[BYTES] = self[BYTES] + #chunk
    return true
  end
  -- what the socket took of the chunk (its framing aside) counts, not the whole chunk: the
  -- access log's size is what was sent
  sent = (sent or 0) - (size and #size or 0)
  self[BYTES] = self[BYTES] + math.max(0, math.min(sent, #chunk))
  self[CLOSE] = true
  return nil, err, code
end

--- Ends the response (the last chunk of a streamed body; an empty body otherwise).
function Response:finish()
  if self[FIN] then return true end
  if not self.sent then return self:send("") end
  self[FIN] = true
  if short_of_length(self) then
    self[CLOSE] = true             -- the client sees the body end early, not the next response
    return nil, "response body shorter than its content-length", "length"
  end
  if self._mode == "chunked" then
    local tr = self._trailers
    if not tr then return write(self, "0\r\n\r\n") end
    local parts = { "0\r\n" }
    for i = 1, #tr, 2 do parts[#parts + 1] = tr[i] .. ": " .. tr[i + 1] .. "\r\n" end
    parts[#parts + 1] = "\r\n"
    return write(self, table.concat(parts))
  end
  return true
end

-- A header list given as a table (name -> value or list of values), checked as res:header
-- checks, as a flat { name, value, ... } array.
local function field_list(fname, t)
  if type(t) ~= "table" then argerror(1, fname, "table expected, got " .. type(t), 4) end
  local list = {}
  for name, v in pairs(t) do
    if type(name) ~= "string" or not name:find("^[A-Za-z0-9!#$%%&'*+%-.^_`|~]+$") then
      argerror(1, fname, "invalid header name", 4)
    end
    for _, value in ipairs(type(v) == "table" and v or { v }) do
      value = tostring(value)
      if not value_ok(value) then argerror(1, fname, "value contains CR, LF or NUL", 4) end
      list[#list + 1] = name:lower()
      list[#list + 1] = value
    end
  end
  return list
end
Response._field_list = field_list

--- res:trailer(name, value): a trailer field, sent after a streamed body (HTTP/1.1 chunked
-- responses, and every HTTP/2 response); call it before finish().
function Response:trailer(name, value)
  if type(name) ~= "string" then argerror(1, "trailer", "string expected, got " .. type(name)) end
  if type(value) ~= "string" and type(value) ~= "number" then
    argerror(2, "trailer", "string expected, got " .. type(value))
  end
  if not value_ok(tostring(value)) then argerror(2, "trailer", "value contains CR, LF or NUL") end
  if self[FIN] then error("response already finished", 2) end
  local list = field_list("trailer", { [name] = value })
  local tr = self._trailers or {}
  for i = 1, #list do tr[#tr + 1] = list[i] end
  self._trailers = tr
  return self
end

--- res:hint(headers): a 103 Early Hints response ahead of the real one (HTTP/1.1 and 2;
-- nothing for an HTTP/1.0 client, which must not get a 1xx).
function Response:hint(headers)
  local list = field_list("hint", headers)
  if self.sent then error("response head already sent", 2) end
  if self[REQ][R_VERSION] == "1.0" then return true end
  local parts = { "HTTP/1.1 103 Early Hints\r\n" }
  for i = 1, #list, 2 do parts[#parts + 1] = list[i] .. ": " .. list[i + 1] .. "\r\n" end
  parts[#parts + 1] = "\r\n"
  return write(self, table.concat(parts))
end

function Response:redirect(url, code)
  if type(url) ~= "string" then argerror(1, "redirect", "string expected, got " .. type(url)) end
  if not value_ok(url) then argerror(1, "redirect", "value contains CR, LF or NUL") end
  code = code or 302
  if math.type(code) ~= "integer" or code < 200 or code > 999 then
    argerror(2, "redirect", "status code expected, got " .. tostring(code))
  end
  self:status(code)
  self:header("location", url)
  self:header("content-type", "text/plain; charset=utf-8")
  return self:send("Redirecting to " .. url .. "\n")
end

-- A response given up before its head went out: nothing is sent, the connection closes
-- (HTTP/2: the stream is reset), as when a file ends early while it is sent.
local function abandon(self)
  self.sent, self[FIN], self[BYTES], self[CLOSE] = true, true, 0, true
  if self[REQ][R_VERSION] == "2" then self[SOCK]:reset(2) end     -- INTERNAL_ERROR
end

-- What open_file says of a file that is gone or no longer a regular file (EINVAL): it changed
-- since the caller's stat. Any other failure to open (EMFILE, EACCES, ...) is the server's.
local changed = { ENOENT = true, ENOTDIR = true, EINVAL = true }

-- res:sendfile's checks, its file and head fields, for both versions (HTTP/2's: h2.lua): the
-- file, open (before anything goes out: the range is measured on it, and a file that cannot
-- be opened is answered, not promised), the offset and length of the range to send, a
-- content type from the path unless one is set; nil, err, code when the file cannot be
-- opened (nothing sent). The caller closes the file. Raises (at sendfile's caller) for
-- misuse. When the range comes from the caller's own stat of the file (static.lua sets
-- _stat_range), the head static made (its length, validators, a Content-Range) fits no
-- other answer: a file that is gone, no longer a regular file or no longer holds the range
-- changed in between, not misuse: abandoned, nil, err, code; one that cannot be opened gets
-- a 500 in its place (the answer to a handler that raised), nil, err, code.
local function sendfile_range(self, path, offset, length)
  if type(path) ~= "string" then argerror(1, "sendfile", "string expected, got " .. type(path), 4) end
  if offset ~= nil and not (math.type(offset) and math.tointeger(offset)) then
    argerror(2, "sendfile", "integer expected, got " .. type(offset), 4)
  end
  if length ~= nil and not (math.type(length) and math.tointeger(length)) then
    argerror(3, "sendfile", "integer expected, got " .. type(length), 4)
  end
  if self.sent then error("response already sent", 3) end
  local file, size, code = core.open_file(path)
  if not file then
    if self._stat_range then
      if changed[code] then
        abandon(self)
      else
        -- (the server's trouble, not the client's: said where the operator looks)
        self[SRV].error_log(("moonwire: cannot open %s: %s"):format(path, tostring(size)))
        self:_internal_error()
      end
    end
    return nil, size, code
  end
  offset = offset or 0
  length = length or (size - offset)
  if offset < 0 or length < 0 or offset + length > size then
    file:close()
    if self._stat_range and offset >= 0 and length >= 0 then
      abandon(self)
      return nil, "file shorter than expected", "EIO"
    end
    error("bad range for sendfile", 3)
  end
  if not self:get_header("content-type") and mime_ok then self:header("content-type", mime.type(path)) end
  return file, offset, length
end
Response._sendfile_range = sendfile_range

--- Sends a file (or a byte range of it) with sendfile(2). A response without a body (1xx,
-- 204, 304, a 2xx to CONNECT) sends the head alone, as res:send("") does.
function Response:sendfile(path, offset, length)
  if bodyless(self) then return self:send("") end
  local file, err, code
  file, offset, length = sendfile_range(self, path, offset, length)
  if not file then return nil, offset, length end
  local _file <close> = file       -- closed however the send ends (a client gone, a timeout)
  self._clen = nil       -- (the range's length is the body's: the head says it, not the handler)
  header_lua(self, "content-length", nil)
  local head = http_head(self[STATUS], self, self[NH], length, connflags(self), self[SRV].server_name, HBASE)
  self.sent, self[FIN] = true, true
  local ok
  ok, err, code = write(self, head)
  if not ok or self[REQ][R_METHOD] == "HEAD" or length == 0 then return ok, err, code end
  if self[SOCK]:tls_info() then
    ok, err, code = self:_copyfile(file, offset, length)   -- no sendfile(2) through TLS
  else
    ok, err, code = self[SOCK]:sendfile(file, offset, length)
  end
  if not ok then
    self[CLOSE] = true
    return nil, err, code
  end
  self[BYTES] = length
  return true
end

-- Copies a range of an open file through the socket in 64 KiB pieces (TLS connections, and
-- HTTP/2's streams); the caller closes the file.
function Response:_copyfile(file, offset, length)
  file:seek("set", offset)
  local left = length
  while left > 0 do
    local piece = file:read(math.min(left, 65536))
    if not piece then return nil, "file shorter than expected", "EIO" end
    if cut(self) then return nil, "closed", "closed" end
    local ok, werr, code = self[SOCK]:write(piece)
    if not ok then return nil, werr, code end
    left = left - #piece
  end
  return true
end

local cookie_attrs = {
  { "path", "Path" }, { "domain", "Domain" }, { "max_age", "Max-Age" }, { "expires", "Expires" },
  { "samesite", "SameSite" },
}

function Response:cookie(name, value, opts)
  if type(name) ~= "string" or name:find("[%c%s\"(),/:;<=>?@%[\\%]{}]") or name == "" then
    argerror(1, "cookie", "cookie name expected")
  end
  if type(value) ~= "string" or value:find("[%c%s\",;\\]") then
    argerror(2, "cookie", "cookie value without spaces, quotes, commas, semicolons or backslashes expected")
  end
  local parts = { name .. "=" .. value }
  opts = opts or {}
  if type(opts) ~= "table" then argerror(3, "cookie", "table expected, got " .. type(opts)) end
  for _, a in ipairs(cookie_attrs) do
    local v = opts[a[1]]
    if v ~= nil then
      -- an attribute's value may hold no ";" (nor a control character): it would start
      -- another attribute ("/; Domain=evil.example")
      if a[1] == "max_age" then
        if math.type(v) ~= "integer" then argerror(3, "cookie", "option 'max_age' must be an integer") end
      elseif type(v) ~= "string" or v:find("[%c;]") then
        argerror(3, "cookie", "option '" .. a[1] .. "' must be a string without ';' or control characters")
      end
      parts[#parts + 1] = a[2] .. "=" .. tostring(v)
    end
  end
  if opts.secure then parts[#parts + 1] = "Secure" end
  if opts.httponly then parts[#parts + 1] = "HttpOnly" end
  return self:header("set-cookie", table.concat(parts, "; "))
end

return Response
