-- luacheck: globals wrk request
-- wrk script for bench/loadgen's "hook" mode: a Lua request() hook called for
-- every request, building each one with wrk.format (a different query string
-- each time, as scripts that vary requests do). The same file runs under wrk
-- (LuaJIT) and `moonwire bench` (Lua 5.4):
--   wrk -t1 -c100 -d5s -s bench/loadgen.d/hook.lua http://127.0.0.1:8080/
local n = 0

function request()
  n = n + 1
  return wrk.format("GET", "/item?id=" .. n)
end
