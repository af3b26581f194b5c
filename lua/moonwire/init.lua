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
    argcheck(math.type(port) == "integer" or (type(port) == "string" and tonumber(port)), 2, "connect",
      "port number expected, got " .. type(port))
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
  if type(s) ~= "number" then
    error(("bad argument #1 to 'timeout' (number expected, got %s)"):format(type(s)), 2)
  end
  if type(fn) ~= "function" then
    error(("bad argument #2 to 'timeout' (function expected, got %s)"):format(type(fn)), 2)
  end
  local prev = deadline_push(s)
  return finish(prev, pcall(fn, ...))
end

return M
