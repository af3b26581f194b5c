--- HTTP/2 for the server: one task reads the connection (h2:run, in C on libnghttp2) and
-- runs each request stream's handler in a worker; the handler gets the same `req` and `res`
-- an HTTP/1.1 request gets (request.lua's Request over an H2Stream; a Response whose sending methods
-- submit to the stream). server.lua calls M.serve with its own after_handler/access_line,
-- so what happens after a handler is one path for both versions.
local core = require "moonwire.core"
local Request = require "moonwire.http.request"
local Response = require "moonwire.http.response"

local h2_server = core.h2_server
local traceback = debug.traceback
local setmetatable, type, error = setmetatable, type, error

local S = Response.slots
local SRV <const> = 1
local REQ <const> = 2
local SOCK <const> = 3        -- the H2Stream
local NH <const> = 4
local FIN <const> = 5
local BYTES <const> = 6
local STATUS <const> = 7
local CLOSE <const> = 8
local HBASE <const> = 10
assert(S.SRV == SRV and S.REQ == REQ and S.SOCK == SOCK and S.NH == NH and S.FIN == FIN and S.BYTES == BYTES
  and S.STATUS == STATUS and S.CLOSE == CLOSE and S.HBASE == HBASE)
local R_METHOD <const> = 6
assert(Request.slots.METHOD == R_METHOD)

local M = {}

-- The response of a request that came over HTTP/2: Response's header, status, cookie and
-- redirect as they are; sending goes to the stream.
local R2 = setmetatable({}, { __index = Response })
R2.__index = R2
M.Response = R2

local argerror, write_arg = Response._argerror, Response._write_arg
local past_length, short_of_length = Response._past_length, Response._short_of_length

-- 1xx, 204, 304 and a 2xx to CONNECT: no DATA, no content-length (response.lua's rule)
local bodyless = Response._bodyless

-- A handler's content-length on a response that has none (all but a 304's, which may say
-- the GET's length): dropped, as HTTP/1.1's head builder drops it.
local function drop_length(self)
  if self._clen and self[STATUS] ~= 304 then self:header("content-length", nil) end
end

-- sends the head and the whole body (no checks: Failed's send_raw too)
local function send_raw(self, body)
  if body == nil then body = "" end
  local srv = self[SRV]
  if #body >= srv._gzip_from then body = Response._maybe_gzip(self, body) end
  local none = bodyless(self)
  if none then drop_length(self) end
  local head = self[REQ][R_METHOD] == "HEAD"
  self.sent, self[FIN] = true, true
  self[BYTES] = (none or head) and 0 or #body
  local tr = self._trailers
  if tr then
    local ok, err, code = self[SOCK]:set_trailers(tr, #tr // 2)
    if not ok then self[CLOSE] = true return nil, err, code end   -- st:done resets the stream
  end
  local data = body
  if none or head then data = nil end
  local ok, err, code = self[SOCK]:respond(self[STATUS], self, self[NH], HBASE, data, true, srv.server_name,
    none and -1 or #body)
  if not ok then self[CLOSE] = true end
  return ok, err, code
end

-- res:send's common case (a string body, nothing to compress, no trailers, a status with a
-- body, not HEAD) is done in C (core.h2_response_send), which calls this for the rest;
-- http_fastpath_spec runs the same cases through both.
local function send_lua(self, body)
  if self.sent then error("response already sent", 2) end
  if body ~= nil and type(body) ~= "string" then argerror(1, "send", "string expected, got " .. type(body)) end
  local clen = self._clen
  if clen and not bodyless(self) and self[REQ][R_METHOD] ~= "HEAD" and clen ~= #(body or "") then
    error(("content-length (%d) does not match the body (%d bytes)"):format(clen, #(body or "")), 3)
  end
  return send_raw(self, body)
end
R2.send = core.h2_response_send(send_lua)

-- the head of a streamed body (no content-length unless the handler set one)
local function start_stream(self)
  local none = bodyless(self)
  if none then drop_length(self) end
  self.sent = true
  local head = self[REQ][R_METHOD] == "HEAD" or none   -- no DATA after a 204 or a 304
  if head then self._mode = "none" end
  local ok, err, code = self[SOCK]:respond(self[STATUS], self, self[NH], HBASE, nil, head,
    self[SRV].server_name, -1)
  if not ok then
    -- no head went out (a reset stream, a connection over): what follows fails the same way,
    -- the stream's write would raise (write before the response head)
    self[CLOSE] = true
    self._head_err, self._head_code = err, code
  end
  if head then self[FIN] = true end
  return ok, err, code
end
R2._head_err = false

--- Streams a piece of the body; waits while the client reads slowly (its stream only).
function R2:write(chunk)
  chunk = write_arg(chunk)
  if self._mode == "none" then return true end      -- HEAD, or a status without a body
  if self[FIN] then error("response already finished", 2) end
  if not self.sent then
    local ok, err, code = start_stream(self)
    if not ok then return nil, err, code end
  end
  if #chunk == 0 or self._mode == "none" then return true end
  past_length(self, chunk)
  if self._head_err then return nil, self._head_err, self._head_code end
  self[BYTES] = self[BYTES] + #chunk
  local ok, err, code = self[SOCK]:write(chunk)
  if not ok then self[CLOSE] = true end
  return ok, err, code
end

--- Ends the response: the last DATA frame (with the trailers set by res:trailer).
function R2:finish()
  if self[FIN] then return true end
  if not self.sent then return self:send("") end
  self[FIN] = true
  if self._head_err then return nil, self._head_err, self._head_code end
  if short_of_length(self) then
    self[CLOSE] = true
    self[SOCK]:reset(2)            -- INTERNAL_ERROR: the client knows the body was cut short
    return nil, "response body shorter than its content-length", "length"
  end
  local tr = self._trailers
  if tr then
    local ok, err, code = self[SOCK]:set_trailers(tr, #tr // 2)
    if not ok then self[CLOSE] = true return nil, err, code end   -- st:done resets the stream
  end
  local ok, err, code = self[SOCK]:write("", true)
  if not ok then self[CLOSE] = true end
  return ok, err, code
end

--- A file (or a byte range of it), read and sent in 64 KiB pieces (the stream's flow
-- control paces it).
function R2:sendfile(path, offset, length)
  if bodyless(self) then return self:send("") end     -- the head alone, as on HTTP/1.1
  local file, ok, err, code
  file, offset, length = Response._sendfile_range(self, path, offset, length)
  if not file then return nil, offset, length end
  local _file <close> = file       -- closed however the send ends (a reset stream, a timeout)
  self:header("content-length", tostring(length))
  ok, err, code = start_stream(self)
  if not ok or self._mode == "none" then return ok, err, code end
  if length > 0 then
    ok, err, code = self:_copyfile(file, offset, length)
    if not ok then
      self[CLOSE] = true
      self[SOCK]:reset()
      return nil, err, code
    end
    self[BYTES] = length
  end
  return self:finish()
end

--- A 103 Early Hints HEADERS frame before the response.
function R2:hint(headers)
  local list = Response._field_list("hint", headers)
  if self.sent then error("response head already sent", 2) end
  return self[SOCK]:respond(103, list, #list // 2, 1)
end

-- Response._copyfile writes through self[SOCK]:write: the stream's write here
R2.Failed = Response.failed_class(R2, send_raw)

--- One request stream: the handler in this task, then what happens after it (server.lua's
-- after_handler and access log), then the stream's slot is given back. h2:run calls it in a
-- worker (a task that waits for the next stream when this one is over: a request costs no
-- new coroutine); a reset stream cancels its pending call.
-- (req.scheme, req.authority and req.protocol are the stream's pseudo-headers, read on first
-- use: request.lua; a named field set here would cost every request a hash insertion)
local function serve_stream(srv, hooks, st, method, target, path, has_body)
  local req = setmetatable({ st, false, not has_body, false, false, method, target, "2", path, true }, Request)
  local res = setmetatable({ srv, req, st, 0, false, 0, 200, false, false, false, false, false, false,
    sent = false }, R2)
  req[2] = res
  local ok, err = xpcall(srv.handler, traceback, req, res)
  if not ok or not res[FIN] then
    local aok, aerr = pcall(hooks.after_handler, srv, req, res, ok, err)
    if not aok then srv.error_log("moonwire: error finishing an HTTP/2 response: " .. tostring(aerr)) end
  end
  if srv.log then
    local lok, lerr = pcall(srv.log, hooks.access_line(req, res))
    if not lok then srv.error_log("moonwire: error in the access log: " .. tostring(lerr)) end
  end
  -- a WebSocket over this stream (websocket.lua): as on HTTP/1.1 (server.lua's requests and
  -- answer_failure), closed with 1011 after a handler that raised, with 1000 after one that
  -- returned, unless it set ws:on handlers: then it lives on, and the stream ends with it
  local tunnel = rawget(res, "_tunnel")
  if tunnel then
    local ws = tunnel.ws
    if ws.state ~= "closed" and (not ok or not ws._on_message) then
      local cok, cerr = pcall(ws.close, ws, ok and 1000 or 1011)
      if not cok then srv.error_log("moonwire: error closing a WebSocket: " .. tostring(cerr)) end
    end
    tunnel.join()
    srv:_h2_ws_done(ws)
  end
  st:done()
end

-- base64url (RFC 4648 §5, padding optional), as HTTP2-Settings carries SETTINGS; nil when bad
local B64 = {}
do
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
  for i = 1, #alphabet do B64[alphabet:byte(i)] = i - 1 end
end

local function base64url(s)
  s = s:gsub("=+$", "")
  local out, bits, nbits = {}, 0, 0
  for i = 1, #s do
    local v = B64[s:byte(i)]
    if not v then return nil end
    bits, nbits = (bits << 6) | v, nbits + 6
    if nbits >= 8 then
      nbits = nbits - 8
      out[#out + 1] = string.char((bits >> nbits) & 0xff)
    end
  end
  return table.concat(out)
end

local hop_by_hop = { connection = true, upgrade = true, ["http2-settings"] = true, ["keep-alive"] = true,
  ["proxy-connection"] = true, ["transfer-encoding"] = true, te = true, host = true }

--- An HTTP/1.1 request with `Upgrade: h2c` (server.lua, on a listener with http2.h2c): when
-- it has no body, offers h2c and carries exactly one valid HTTP2-Settings, answers 101 and
-- returns what M.serve needs to answer it as stream 1; nil to go on with HTTP/1.1.
function M.h2c_upgrade(req, sock)
  if not req[3] then return nil end        -- a body (slot 3: the message ended with its head)
  local h = req.headers
  local up, conn = (h.upgrade or ""):lower(), (h.connection or ""):lower()
  if not up:find("%f[%w]h2c%f[^%w]") or not conn:find("http2%-settings") then return nil end
  local multi = rawget(req, "_multi")
  if multi and multi["http2-settings"] then return nil end
  local settings = h["http2-settings"] and base64url(h["http2-settings"])
  if not settings or #settings % 6 ~= 0 then return nil end
  local fields = { ":method", req.method, ":scheme", "http", ":path", req.target,
    ":authority", h.host or "" }
  for name, value in pairs(h) do
    if not hop_by_hop[name] then
      for _, v in ipairs(multi and multi[name] or { value }) do
        fields[#fields + 1] = name
        fields[#fields + 1] = v
      end
    end
  end
  if not sock:write("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n") then
    return nil
  end
  return { h2c = true, settings = settings, head = req.method == "HEAD", fields = fields }
end

--- Serves an HTTP/2 connection whose client preface is buffered (prior knowledge, or ALPN
-- h2 on TLS) until it ends; returns when every stream's handler has finished. `upgraded`:
-- a request that came as HTTP/1.1 with Upgrade: h2c (M.h2c_upgrade), answered as stream 1.
function M.serve(srv, sock, hooks, upgraded)
  local h2 = h2_server(sock, srv.h2_settings, srv, upgraded)
  srv._conns[sock] = h2          -- Server:close: h2:shutdown(true), or closes an idle one
  h2:run(serve_stream, srv, hooks)
end

return M
