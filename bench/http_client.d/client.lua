-- bench/http_client's load: a plain Lua loop over moonwire's HTTP client.
-- TASKS tasks (default 100), each looping `client:request{ url = URL }` +
-- `res:body()` for SECS seconds over one shared `http.client{ max_per_origin =
-- TASKS }`: the full Lua API per request, nothing batched or pipelined.
--
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' \
--     lua5.4 bench/http_client.d/client.lua URL [SECS] [TASKS]
--
-- Prints one line of key=value pairs on stdout:
--   requests=N errors=E secs=S rps=R cpu_s=C idle=I active=A bytes=B
-- (cpu_s: this process's CPU time, os.clock(); idle/active: the client's pool at
-- the end). The first few errors go to stderr. Exit status 1 when nothing
-- succeeded or any request failed.
local mw = require "moonwire"
local http = require "moonwire.http"

local target = assert(arg[1], "usage: client.lua URL [SECS] [TASKS]")
local secs = tonumber(arg[2] or 5)
local ntasks = math.tointeger(tonumber(arg[3] or 100))
assert(secs and secs > 0 and ntasks and ntasks > 0, "usage: client.lua URL [SECS] [TASKS]")

local count, errors, bytes = 0, 0, 0
local elapsed, stats

local function failed(msg)
  errors = errors + 1
  if errors <= 3 then io.stderr:write("client.lua: ", tostring(msg), "\n") end
end

mw.run(function()
  local client = http.client{ max_per_origin = ntasks }
  local t0 = mw.now()
  local deadline = t0 + secs
  local function loop()
    while mw.now() < deadline do
      local res, err = client:request{ url = target }
      if not res then
        failed(err)
      else
        local body, berr = res:body()
        if not body then
          failed(berr)
        elseif res.status ~= 200 then
          failed("status " .. res.status)
        else
          count = count + 1
          bytes = bytes + #body
        end
      end
    end
  end
  local tasks = {}
  for i = 1, ntasks do tasks[i] = mw.spawn(loop) end
  for i = 1, ntasks do
    local ok, err = tasks[i]:join()
    if not ok then failed(err) end
  end
  -- mw.now() is cached per loop turn: fine at this scale.
  elapsed = mw.now() - t0
  stats = client:stats()
  client:close()
end)

print(("requests=%d errors=%d secs=%.3f rps=%.1f cpu_s=%.3f idle=%d active=%d bytes=%d"):format(count, errors,
  elapsed, count / elapsed, os.clock(), stats.idle or 0, stats.active or 0, bytes))
io.stdout:flush()
os.exit((errors == 0 and count > 0) and 0 or 1)
