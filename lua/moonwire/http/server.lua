--- The HTTP/1.1 server: one task per connection, requests parsed in C, answered in order.
local mw = require "moonwire"
local core = require "moonwire.core"
local seconds = require("moonwire.opts").seconds
local Request = require "moonwire.http.request"
local Response = require "moonwire.http.response"

local http_conn, http_head, read_request = core.http_conn, core.http_head, core.http_read_request
local h2_preface = core.h2_preface
local dispatch = core.dispatch
-- a response's array slots (see response.lua; one constant per declaration, as there)
local FIN <const> = 5
local BYTES <const> = 6
local STATUS <const> = 7
local NH <const> = 4
local CLOSE <const> = 8
local UPGRADED <const> = 9
assert(Response.slots.FIN == FIN and Response.slots.BYTES == BYTES and Response.slots.STATUS == STATUS
  and Response.slots.NH == NH and Response.slots.CLOSE == CLOSE and Response.slots.UPGRADED == UPGRADED
  and Response.slots.HBASE == 10)
-- a request's: keep-alive, and whether the message ended with its head (see request.lua)
local R_KEEPALIVE <const> = 10
local R_NOBODY <const> = 3
local R_UPGRADE <const> = 5
assert(Request.slots.KEEPALIVE == R_KEEPALIVE and Request.slots.METHOD == 6 and Request.slots.VERSION == 8
  and Request.slots.UPGRADE == R_UPGRADE)
local traceback = debug.traceback
local setmetatable = setmetatable

local M = {}

local Server = {}
Server.__index = Server

local default_limits = { request_line = 8192, head = 16384, headers = 100, body = 1048576, linger = 4194304 }
local default_timeouts = { head = 10, body = 30, idle = 5, write = 30, linger = 5 }
-- a body the handler left unread is read and dropped up to this size, else the connection
-- closes, and its response said so (http.c: unread_closes)
local DRAIN_MAX = core.http_drain_max

local h2_settings
local function merge(defaults, given, what)
  local t = {}
  for k, v in pairs(defaults) do t[k] = v end
  if given ~= nil then
    if type(given) ~= "table" then error(("bad option '%s' (table expected)"):format(what), 4) end
    for k, v in pairs(given) do
      if defaults[k] == nil then error(("unknown %s option '%s'"):format(what, tostring(k)), 4) end
      local want = type(defaults[k])
      if type(v) ~= want then error(("bad %s option '%s' (%s expected)"):format(what, k, want), 4) end
      if v ~= v then error(("bad %s option '%s' (not a number)"):format(what, k), 4) end
      if what == "limits" and (not math.tointeger(v) or v < 0) then
        error(("bad limits option '%s' (non-negative integer expected)"):format(k), 4)
      end
      t[k] = v
    end
  end
  return t
end

local function stderr_log(line) io.stderr:write(line, "\n") end

local function make_logger(log)
  if log == nil or log == false then return false end   -- (false: a raw hit for srv.log)
  if type(log) == "function" then return log end
  if log == "stderr" then return stderr_log end
  if type(log) == "string" then
    local f = assert(io.open(log, "a"))
    f:setvbuf("line")
    return function(line) f:write(line, "\n") end
  end
  error("bad option 'log' (path, \"stderr\" or function expected)", 4)
end

-- A field of the client's in a log line, escaped as nginx does: `"`, `\` and the bytes
-- outside printable ASCII as \xHH, so that the client cannot end a quoted field and forge
-- the rest of its own line (nor put a line break or a terminal escape in the log).
local function hex_byte(c) return ("\\x%02X"):format(c:byte()) end
local function log_escape(s)
  return (s:gsub('[\0-\31"\\\127-\255]', hex_byte))
end

-- Combined log format.
local function access_line(req, res)
  local h = req.headers
  local host = req.remote_addr
  if host == nil or host == "" then host = "-" end    -- (a Unix socket's peer has none)
  return ('%s - - [%s] "%s %s HTTP/%s" %d %d "%s" "%s"'):format(host,
    os.date("%d/%b/%Y:%H:%M:%S %z"), req.method, log_escape(req.target), req.version, res[STATUS],
    res[BYTES] or 0, log_escape(h.referer or "-"), log_escape(h["user-agent"] or "-"))
end

local function send_error(sock, status, msg)
  local body = msg and (msg .. "\n") or ""
  local head = http_head(status, { "content-type", "text/plain; charset=utf-8" }, 1, #body, 1, "moonwire")
  sock:write(head, body)
end

-- After a response whose request body was not read to its end: read and drop what is left
-- (up to DRAIN_MAX) so the connection can serve the next request, or say it cannot. A body
-- the server will not drain (a 100 Continue still awaited, a declared length over
-- DRAIN_MAX) closed the connection already: its response said Connection: close
-- (hc:unread_closes, from res:send). What is left here can still fail after a keep-alive
-- answer: a chunked body past DRAIN_MAX (its size is not known ahead), a body that does not
-- come within timeouts.body; the connection closes all the same (docs/http.md).
local function settle(srv, hc, req)
  if srv.closing then return false end  -- no next request: do not wait for the rest of a body
  if rawget(req, "_body_error") then return false end
  if hc:unread_closes() then return false end   -- (the rule its response followed: never drained)
  local ok = hc:read_body("discard", DRAIN_MAX, srv.timeouts.body)
  return ok == true
end

-- The lingering close (nginx's): after an error answer while the client may still be sending
-- (a body left unread, bytes after a bad head), shut the write side down (the answer, then the
-- end of the stream), then read and drop what still comes until the client closes, for at
-- most timeouts.linger seconds and limits.linger bytes. Closing at once with unread bytes
-- would reset the connection, and a reset can destroy the answer before the client reads it.
-- The connection stays counted meanwhile; a closing server does not linger, and Server:close
-- closes the sockets of the connections that do (their slot in _conns says `true`). (Called
-- protected: the socket may have been closed under it.)
local function linger(srv, sock)
  if srv.closing then return end
  srv._conns[sock] = true
  mw._linger(sock, srv.timeouts.linger, srv.limits.linger, function() return srv.closing end)
end

-- After the handler, when it raised or left the response unfinished.
local function after_handler(srv, req, res, ok, err)
  if not ok then
    srv.error_log(("moonwire: handler error for %s %s: %s"):format(req.method, req.target, tostring(err)))
    if res._answer_failure then
      res:_answer_failure()    -- its body failed: that failure's answer (response.lua), not 500
    elseif not res.sent then
      res[CLOSE] = true
      res:_internal_error()
    else
      res[CLOSE] = true
    end
    return
  end
  if not res[FIN] then
    if res.sent then
      res:finish()
    elseif res._touched or res[NH] > 0 then
      local sok, serr = pcall(res.send, res, "")
      if not sok then      -- (a content-length the handler set, and no body): its error
        return after_handler(srv, req, res, false, serr)
      end
    else
      res[STATUS] = 204
      res:send()
    end
  end
end

-- The requests of one connection, in order; cur[1] holds the request being answered (false
-- between requests; its response is in its slot 2), for serve_http1 when a handler raises.
-- A request that asks to switch protocols is returned before its handler runs (the upgrade
-- hand-off: serve_upgrade); `r`, when given, is such a request, answered there and not
-- upgraded or done with: the loop goes on from what follows its handler. Returns a
-- WebSocket that keeps the connection, or true when the connection closes after an error
-- while the client may still be sending (serve_http1 lingers).
local function requests(srv, sock, hc, cur, r)
  -- (few locals: this frame's size adds to the stack of every connection's coroutine; the
  -- response's constructor takes 14 registers for a moment, measured not to enlarge an idle
  -- connection)
  local handler, log = srv.handler, srv.log
  local rs, err, status
  if r then
    rs = r[2]
    goto answered
  end
  if srv.closing then return end
  do
    -- a new connection must send its first request (and its TLS handshake) within the head
    -- timeout; later requests on it may wait the idle timeout for their first byte (hc knows
    -- both: read_request without them uses the server's)
    local head = srv.timeouts.head
    r, err, status = read_request(hc, math.min(srv.timeouts.idle, head), head)
  end
  -- (a loop of gotos: a request answered by serve_upgrade enters it after its handler)
  ::next_request::
  if not r then
    if math.type(status) == "integer" then
      send_error(sock, status, err)
      return true
    end
    return
  end
  -- the response (see response.lua): its slots, room for two headers, and `sent`; it goes in
  -- the request's slot 2
  rs = setmetatable({ srv, r, sock, 0, false, 0, 200, false, false, false, false, false, false,
    sent = false }, Response)
  r[2] = rs
  if r[R_UPGRADE] then return r end
  cur[1] = r
  handler(r, rs)
  ::answered::
  if not rs[FIN] then after_handler(srv, r, rs, true) end
  cur[1] = false
  if log then log(access_line(r, rs)) end
  -- ready for the next request? (the common case inline, the rest in settle; a closing
  -- server's connections: read_request says "closed")
  if rs[CLOSE] or not r[R_KEEPALIVE] then
    if rs[UPGRADED] then
      -- the handler took the connection over (a WebSocket, in the server's _conns since
      -- Server:_upgraded): make sure it is closed, unless the WebSocket has a message handler,
      -- which keeps it without this task
      local ws = srv._conns[sock]
      if type(ws) ~= "table" then return end     -- (the 101 could not be sent)
      if ws._on_message then return ws end
      if ws.state ~= "closed" then ws:close(1000) end
      return
    end
    return not r[R_NOBODY] and not hc:msg_done()    -- a body left unread: linger
  end
  if not r[R_NOBODY] and not hc:msg_done() and not settle(srv, hc, r) then return true end
  r, rs = nil, nil      -- luacheck: ignore 311 (an idle connection keeps nothing of its last request)
  r, err, status = read_request(hc)
  goto next_request
end

-- A connection is over: forget it, close it, and say so when it was the last one.
local function conn_done(srv, sock)
  srv._conns[sock] = nil
  srv._nconns = srv._nconns - 1
  sock:close()
  if srv._drained and srv._nconns == 0 then srv._drained:close() end
end

-- A handler raised: the 500 (or the end of what was sent), the access log line, and 1011
-- for a WebSocket it had taken over.
local function answer_failure(srv, sock, req, err)
  local res = rawget(req, 2)
  after_handler(srv, req, res, false, err)
  if srv.log then srv.log(access_line(req, res)) end
  local ws = res[UPGRADED] and srv._conns[sock]
  if type(ws) == "table" and ws.state ~= "closed" then ws:close(1011) end
end

-- The request loop raised, or the handler of a request handed off to serve_upgrade: the
-- request being answered (if any) gets its answer.
local function request_failed(srv, sock, hc, req, err)
  if req then
    -- (protected: the 500 can fail too, on a socket closed meanwhile; the connection is
    -- done all the same)
    local aok, aerr = pcall(answer_failure, srv, sock, req, err)
    if not aok then srv.error_log("moonwire: error answering a failed request: " .. tostring(aerr)) end
    if not req[R_NOBODY] and not hc:msg_done() then pcall(linger, srv, sock) end
  else
    srv.error_log("moonwire: error serving a connection: " .. tostring(err))
  end
end

-- An HTTP/2 connection (h2.lua), with this file's after_handler and access log.
local h2_hooks = { after_handler = after_handler, access_line = access_line }

local function serve_h2(srv, sock, upgraded)
  local ok, err = xpcall(require("moonwire.http.h2").serve, traceback, srv, sock, h2_hooks, upgraded)
  if not ok then srv.error_log("moonwire: error serving an HTTP/2 connection: " .. tostring(err)) end
  conn_done(srv, sock)
end

-- Whether the connection speaks HTTP/2: its first bytes are the client preface (cleartext
-- prior knowledge), on TLS only when ALPN chose h2 (never prior knowledge over a TLS
-- connection that negotiated http/1.1). nil when the connection ended or timed out first.
local function wants_h2(srv, sock)
  local yes = h2_preface(sock, math.min(srv.timeouts.idle, srv.timeouts.head))
  if yes == nil then return nil end
  if yes and srv.tls then
    local info = sock:tls_info()
    return info ~= nil and info.alpn == "h2"
  end
  return yes
end

local serve_upgrade, upgraded_body

-- The HTTP/1.1 requests of a connection (from what follows the handler of r, when given:
-- see requests), then its end. One protected call for all of them, not one per request: a
-- handler that raises ends the loop, and the connection closes after its 500 anyway.
local function serve_http1(srv, sock, hc, r)
  local cur = { false }
  local ok, err = xpcall(requests, traceback, srv, sock, hc, cur, r)
  if ok and getmetatable(err) == Request then return serve_upgrade(srv, sock, err) end
  if ok and err then
    if err == true then
      pcall(linger, srv, sock)
    elseif err.state ~= "closed" then
      srv._conns[sock] = err    -- a WebSocket with a message handler: Server:_ws_done ends it
      return
    end
  end
  if not ok then request_failed(srv, sock, hc, cur[1], err) end
  conn_done(srv, sock)
end

-- The upgrade hand-off. A request that asks to switch protocols (Connection: upgrade, as a
-- WebSocket handshake does) leaves the request loop before its handler runs, and the
-- handler runs in a fresh task, its frame at slot 5 of the stack: a handler that upgrades
-- and loops over ws:messages() keeps that task as long as the connection lasts, with only
-- what it holds itself (not the loop's locals, the HTTP connection object and the response:
-- Server:_upgraded lets go of what the request holds) and a stack that nothing deeper has
-- grown (Lua never shrinks a waiting task's stack back to its first 40 slots; the request
-- loop's task, deeper, goes back to the worker pool). Then the loop goes on from what follows
-- the handler (serve_http1 again, in the new task): it closes the WebSocket, or the
-- connection, or (`Connection: upgrade` without an Upgrade header) serves the next request.
function serve_upgrade(srv, sock, r)
  -- Upgrade: h2c on a listener that takes it: this request is answered over HTTP/2, as stream 1
  if srv.h2c then
    local up = require("moonwire.http.h2").h2c_upgrade(r, sock)
    if up then return serve_h2(srv, sock, up) end
  end
  -- (a declined upgrade goes on as HTTP/1.1: http.c resumes parsing after it; a CONNECT the
  -- handler did not take over has tunnel bytes, not requests, behind it: the connection ends)
  if r.method == "CONNECT" then r[2][CLOSE] = true end
  rawset(r, "_server", srv)     -- (what Server:_upgraded sets: no lookup in the new task)
  rawset(r, "socket", sock)
  mw.spawn(upgraded_body, r, srv.handler, r[2])
end

-- The handler of a request asking to switch protocols runs in a task of its own
-- (serve_upgrade), its frame at slot 5 of the stack (core.protected_body); then what follows
-- it in the request loop.
local function after_upgrade_handler(r, ok, err)
  local srv, sock = rawget(r, "_server"), rawget(r, "socket")
  if ok then return serve_http1(srv, sock, r[1], r) end
  request_failed(srv, sock, r[1], r, err)
  conn_done(srv, sock)
end
upgraded_body = core.protected_body(after_upgrade_handler, traceback)

-- What an upgraded request holds instead of its HTTP connection object (request.lua asks it
-- for the body and the trailers: there are none any more) and of its response (what the
-- loop reads of a response after its handler: the 101 was sent, the connection was taken
-- over). A request keeps its socket, headers and server.
local released_conn = {
  msg_done = function() return true end,
  state = function() return true, true, false, false end,
  read_body = function() return nil, "the connection was upgraded", "closed" end,
  trailers = function() return nil end,
  clear_expect = function() end,
  unread_closes = function() return false end,
}
local upgraded_res = { false, false, false, 0, true, 0, 101, true, true, sent = true }

-- (websocket.lua) req was upgraded to ws: the connection is the WebSocket's now. A task
-- looping over ws:messages() keeps req alive as long as the connection lasts, so req lets
-- go of its HTTP connection object (and its parser's buffers) and of its response. The
-- WebSocket takes the connection's place in _conns (Server:close closes it with 1001).
function Server:_upgraded(req, ws)
  local _ = req.headers       -- (cached in req: request.lua; the WebSocket's upgrade read them)
  rawset(req, "socket", ws.sock)
  rawset(req, "_server", self)
  req[1]:release()
  req[1], req[2] = released_conn, upgraded_res
  self._conns[ws.sock] = ws
end

-- (websocket.lua, h2.lua) a WebSocket over an HTTP/2 stream: its connection stays the HTTP/2
-- one's, in _conns; Server:close closes the WebSocket itself with 1001 (set by key, weakly)
function Server:_h2_upgraded(ws)
  local set = self._h2ws
  if not set then
    set = setmetatable({}, { __mode = "k" })
    self._h2ws = set
  end
  set[ws] = true
  if self.closing then mw.spawn(ws.close, ws, 1001) end
end

function Server:_h2_ws_done(ws)
  if self._h2ws then self._h2ws[ws] = nil end
end

local function serve_connection(srv, sock)
  local conns = srv._conns
  srv._nconns = srv._nconns + 1
  sock:settimeout(srv.timeouts.write)
  if srv.h2_settings then
    local h2 = wants_h2(srv, sock)
    if h2 ~= false then
      if h2 then return serve_h2(srv, sock) end
      return conn_done(srv, sock)
    end
  end
  local hc = http_conn(sock, srv.limits, Request, false, Request.headers_mt, srv)
  conns[sock] = hc     -- hc:idle() says whether it waits for its next request
  return serve_http1(srv, sock, hc)    -- (a tail call: this frame keeps nothing alive meanwhile)
end

-- (websocket.lua) a WebSocket with a message handler, handed over above, is closed. (An
-- HTTP/2 one's socket is an end of its tunnel's pair, never in _conns: nothing to do here,
-- h2.lua's serve_stream ends its stream.)
function Server:_ws_done(ws)
  if self._conns[ws.sock] == ws then conn_done(self, ws.sock) end
end

local function accept_loop(srv)
  local l = srv.listener
  -- (each connection in a worker task, from the scheduler's pool: a connection upgraded to a
  -- WebSocket gives its task back, serve_upgrade, and a task made for each one would be
  -- garbage, which a burst of new connections adds to the process's size)
  local function serve(sock) return serve_connection(srv, sock) end
  -- (closing is checked first: a server closed before this task first ran has a closed
  -- listener, and accept on it raises)
  while not srv.closing do
    local sock, err, code = l:accept()
    if not sock then
      if code == "closed" or code == "cancelled" or srv.closing then return end
      if code == "EMFILE" or code == "ENFILE" then
        mw.sleep(0.05)         -- out of descriptors: let connections finish
      else
        srv.error_log("moonwire: accept failed: " .. tostring(err))
      end
    else
      dispatch(serve, sock)
    end
  end
end

--- Stops accepting, lets in-flight requests finish (at most `grace` seconds), closes idle
-- keep-alive connections. Returns when every connection is closed.
function Server:close(grace)
  if self.closing then
    if self._drained then self._drained:recv(grace or self.grace) end
    return true
  end
  self.closing = true
  self.listener:close()
  grace = grace or self.grace
  -- idle connections are parked in read_request: closing their socket ends them; the
  -- others close after their response (res:send's C path asks the connection, not
  -- self.closing); WebSockets with a message handler go away with the close handshake
  for sock, c in pairs(self._conns) do
    if type(c) == "table" then mw.spawn(c.close, c, 1001)
    elseif c == true then sock:close()                -- lingering
    elseif c.shutdown then c:shutdown(true)   -- HTTP/2: GOAWAY; in-flight streams finish, idle ones close
    elseif c:idle() then sock:close()
    else c:closing() end
  end
  for ws in pairs(self._h2ws or {}) do mw.spawn(ws.close, ws, 1001) end   -- over HTTP/2
  if self._nconns > 0 then
    self._drained = mw.channel(0)
    if mw.current() then
      self._drained:recv(grace)
      -- cut off: a handler still running there gets nil, "closed", "closed" from its writes
      -- (response.lua), not the raise of a socket it closed itself; its connection counts
      -- until it returns
      local cut = setmetatable({}, { __mode = "k" })
      self._cut = cut
      for sock in pairs(self._conns) do
        cut[sock] = true
        sock:close()
      end
    end
  end
  return true
end

function Server:connections()
  return self._nconns
end

-- HTTP/2 (h2.lua, h2.c): on unless `http2 = false`; a table sets its limits (max_streams,
-- stream_window, conn_window, header_fields, header_bytes, hwm, out_hwm, glitches,
-- settings_timeout, trim_after: seconds idle before a connection gives its session's pages
-- back and stows it, negative never; park_hpack: then also the client's HPACK table, and
-- responses are not indexed); the timeouts are the server's (head, idle, write).
local h2_defaults = { max_streams = 100, stream_window = 262144, conn_window = 8388608, header_fields = 128,
  header_bytes = 65536, hwm = 65536, out_hwm = 65536, glitches = 1000, settings_timeout = 10, h2c = false,
  trim_after = 1, park_hpack = false }

-- their ranges: what SETTINGS and WINDOW_UPDATE can carry (RFC 9113 §6.5.2, §6.9.1), what
-- h2.c's counters hold; hwm 0 would never let the connection read again
local I31, I32 = 2 ^ 31 - 1, 2 ^ 32 - 1
local h2_ranges = { max_streams = { 1, I31 }, stream_window = { 0, I31 }, conn_window = { 0, I31 },
  header_fields = { 1, I32 }, header_bytes = { 1, I32 }, hwm = { 1, 2 ^ 53 }, out_hwm = { 0, 2 ^ 53 },
  glitches = { 0, I32 } }

function h2_settings(given, srv)
  if given == false then return false end
  if given ~= nil and given ~= true and type(given) ~= "table" then
    error("bad option 'http2' (boolean or table expected)", 4)
  end
  local t = merge(h2_defaults, type(given) == "table" and given or nil, "http2")
  for k, r in pairs(h2_ranges) do
    local v = t[k]
    if v ~= math.floor(v) or v < r[1] or v > r[2] then
      error(("bad http2 option '%s' (integer %d-%d expected, got %s)"):format(k, r[1], r[2], tostring(v)), 4)
    end
  end
  local st = t.settings_timeout
  if st ~= st or st <= 0 then
    error(("bad http2 option 'settings_timeout' (positive number expected, got %s)"):format(t.settings_timeout), 4)
  end
  t.head_timeout, t.idle_timeout, t.write_timeout = srv.timeouts.head, srv.timeouts.idle, srv.timeouts.write
  t.connect_protocol = true
  return t
end

-- The options of http.server and http.serve (a misspelt one raises: `timeout = 5` would
-- otherwise leave the defaults in place unnoticed, as an unknown limit or timeout raises)
local OPTIONS = { host = true, port = true, unix = true, handler = true, workers = true,
  backlog = true, log = true, error_log = true, server_name = true, gzip = true, gzip_min = true,
  grace = true, limits = true, timeouts = true, tls = true, http2 = true, reuseport = true,
  listener = true, on_listen = true, bus = true }

local function is_fn(v) return type(v) == "function" end
local function is_bool(v) return type(v) == "boolean" end
local function is_num(v) return type(v) == "number" and v == v end
-- (grace is a timeout: a number or a numeric string, docs/api.md)
local function is_secs(v) return seconds(v) ~= nil end
local OPTION_TYPES = {          -- name = { check, what it wants }
  error_log = { is_fn, "function" }, on_listen = { is_fn, "function" }, gzip = { is_bool, "boolean" },
  bus = { is_bool, "boolean" }, grace = { is_secs, "number" },
  gzip_min = { function(v) return is_num(v) and v >= 0 end, "non-negative number" },
  -- (a field value: no CR, LF or NUL, as res:header asks)
  server_name = { function(v) return v == false or (type(v) == "string" and not v:find("[\r\n%z]")) end,
    "string without CR, LF or NUL, or false" },
  listener = { function(v) return type(v) == "userdata" end, "listener" },
}

local function check_opts(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'server' (table expected, got " .. type(opts) .. ")", 3) end
  for k in pairs(opts) do
    if not OPTIONS[k] then error("unknown option '" .. tostring(k) .. "'", 3) end
  end
  local h = opts.handler
  local mt = getmetatable(h)
  if type(h) ~= "function" and not (mt and mt.__call) then
    error("bad option 'handler' (function expected, got " .. type(h) .. ")", 3)
  end
  -- the rest are used only later (per request, on close): a bad value raises here, not there
  for k, t in pairs(OPTION_TYPES) do
    local v = opts[k]
    if v ~= nil and not t[1](v) then
      error(("bad option '%s' (%s expected, got %s)"):format(k, t[2], type(v)), 3)
    end
  end
end

--- The process's default pubsub instance (ws:join's), if one was made, is closed: http.serve
-- and each worker call this after their server closed, or its subscriber would keep the loop
-- (and the process) running after SIGTERM.
function M.close_pubsub()
  local ps = package.loaded["moonwire.pubsub"]
  if ps then ps.close_default() end
end

--- Creates and starts a server inside a running loop; returns at once.
function M.server(opts)
  check_opts(opts)
  local srv = setmetatable({
    handler = opts.handler,
    limits = merge(default_limits, opts.limits, "limits"),
    timeouts = merge(default_timeouts, opts.timeouts, "timeouts"),
    log = make_logger(opts.log),
    error_log = opts.error_log or stderr_log,
    server_name = opts.server_name == nil and "moonwire" or opts.server_name or nil,
    gzip = opts.gzip ~= false,
    gzip_min = opts.gzip_min or 1024,
    grace = tonumber(opts.grace) or 10,
    closing = false,
    _conns = {}, _nconns = 0,
  }, Server)
  srv.h2_settings = h2_settings(opts.http2, srv)
  srv.h2c = srv.h2_settings and srv.h2_settings.h2c or false
  -- bodies from this size on may be compressed (res:send, and its C path through http_conn)
  srv._gzip_from = srv.gzip and srv.gzip_min or math.huge
  local l, err, code
  if opts.tls and not opts.listener then
    local tls = opts.tls
    if srv.h2_settings and type(tls) == "table" and tls.alpn == nil then
      -- h2 preferred by ALPN, http/1.1 for the rest (a copy: the caller's table stays as given)
      tls = {}
      for k, v in pairs(opts.tls) do tls[k] = v end
      tls.alpn = { "h2", "http/1.1" }
    end
    srv.tls = require("moonwire.tls").server_context(tls)
  end
  if opts.listener then
    l = opts.listener
  elseif opts.unix then
    -- (with tls: https on the Unix socket, as on TCP; it was plaintext, the option unseen)
    l, err, code = mw.unix.listen{ path = opts.unix, backlog = opts.backlog }
    if l and srv.tls then l = l:set_tls(srv.tls) end
  else
    l, err, code = mw.tcp.listen{ host = opts.host or "127.0.0.1", port = opts.port or 8080,
      backlog = opts.backlog, reuseport = opts.reuseport, tls = srv.tls }
  end
  if not l then return nil, err, code end
  srv.listener = l
  if opts.unix then
    srv.path = l:getsockname()
  else
    srv.host, srv.port = l:getsockname()
  end
  srv._accept = mw.spawn(accept_loop, srv)
  return srv
end

return M
