--- moonwire: network programming in plain, straight-line Lua.
-- The C core (moonwire.core) runs the event loop, the tasks and the sockets; this module
-- is the public face: it re-exports the core and adds what is best written in Lua.
local core = require "moonwire.core"

local M = {
  version = core.version,
  run = core.run, spawn = core.spawn, stop = core.stop, now = core.now,
  current = core.current, sleep = core.sleep, yield = core.yield,
  on_error = core.on_error, signal = core.signal, resolve = core.resolve,
  tcp = core.tcp, unix = core.unix,
}

M.channel = require "moonwire.channel"

-- protocol modules load on first use: mw.http
local lazy = { http = "moonwire.http", websocket = "moonwire.websocket", url = "moonwire.url" }
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
