--- moonwire: network programming in plain, straight-line Lua.
-- The C core (moonwire.core) runs the event loop, the tasks and the sockets; this module
-- is the public face: it re-exports the core and adds what is best written in Lua.
local core = require "moonwire.core"

local M = {
  version = core.version,
  run = core.run, spawn = core.spawn, stop = core.stop, now = core.now,
  current = core.current, sleep = core.sleep, yield = core.yield,
  on_error = core.on_error, signal = core.signal, resolve = core.resolve,
  unix = core.unix,
}

-- TCP with optional TLS: connect/listen take `tls = { ... }` (or a context)
local tcp_connect, tcp_listen = core.tcp.connect, core.tcp.listen
local function argcheck(ok, n, fname, msg)
  if not ok then error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3) end
end
M.tcp = {
  connect = function(host, port, opts)
    argcheck(type(host) == "string", 1, "connect", "string expected, got " .. type(host))
    -- (an integral float, 6379.0, is that port: Lua's integer arguments take one)
    if math.type(port) == "float" and math.tointeger(port) then port = math.tointeger(port) end
    argcheck(math.type(port) == "integer" or (type(port) == "string" and tonumber(port)), 2, "connect",
      "port number expected, got " .. (type(port) == "number" and tostring(port) or type(port)))
    argcheck(opts == nil or type(opts) == "table", 3, "connect", "table expected, got " .. type(opts))
    if opts and opts.tls then
      return require("moonwire.tls").connect(tcp_connect, host, port, opts)
    end
    return tcp_connect(host, port, opts)
  end,
  listen = function(opts)
    argcheck(type(opts) == "table", 1, "listen", "table expected, got " .. type(opts))
    if opts.tls then
      local ctx = require("moonwire.tls").server_context(opts.tls)
      local l, err, code = tcp_listen(opts)
      if not l then return nil, err, code end
      return l:set_tls(ctx)
    end
    return tcp_listen(opts)
  end,
}

M.channel = require "moonwire.channel"

-- protocol modules load on first use: mw.http
local lazy = { http = "moonwire.http", websocket = "moonwire.websocket", url = "moonwire.url",
  tls = "moonwire.tls", redis = "moonwire.redis" }
setmetatable(M, { __index = function(t, k)
  local name = lazy[k]
  if name then
    local v = require(name)
    rawset(t, k, v)
    return v
  end
end })

local deadline_push, deadline_pop = core.deadline_push, core.deadline_pop

local function finish(prev, ok, ...)
  deadline_pop(prev)
  if not ok then error((...), 0) end
  return ...
end

--- Runs fn(...) with a deadline `s` seconds away for every blocking call inside it.
function M.timeout(s, fn, ...)
  -- a number or a numeric string, as for every other timeout; NaN raises
  local n = tonumber(s)
  if type(s) ~= "number" and (type(s) ~= "string" or not n) then
    error(("bad argument #1 to 'timeout' (number expected, got %s)"):format(type(s)), 2)
  end
  if n ~= n then error("bad argument #1 to 'timeout' (not a number)", 2) end
  if type(fn) ~= "function" then
    error(("bad argument #2 to 'timeout' (function expected, got %s)"):format(type(fn)), 2)
  end
  local prev = deadline_push(n)
  return finish(prev, pcall(fn, ...))
end

-- (internal) The lingering close's reading half, for the HTTP server and WebSocket: with
-- the write side shut, what the peer still sends is read and dropped until it closes, for at
-- most `seconds` and `bytes`, or until stop() says so. A socket closed at once with unread
-- bytes is reset by the kernel, and the peer may lose what was sent last before it reads it.
function M._linger(sock, seconds, bytes, stop)
  if not sock:shutdown("write") then return end
  local deadline = M.now() + seconds
  while bytes > 0 do
    local wait = deadline - M.now()
    if wait <= 0 or (stop and stop()) then return end
    local piece = sock:recv(math.min(bytes, 65536), wait)
    if not piece then return end
    bytes = bytes - #piece
  end
end

return M
