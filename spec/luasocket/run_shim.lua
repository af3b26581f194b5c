-- Runs a LuaSocket script unchanged under mw.run with moonwire.socket installed as `socket`
-- (and `ssl`): lua5.4 spec/luasocket/run_shim.lua script.lua args...
local mw = require "moonwire"
local script = table.remove(arg, 1)
mw.run(function()
  require("moonwire.socket").install()
  local chunk = assert(loadfile(script))
  chunk(table.unpack(arg))
end)
