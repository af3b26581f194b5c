-- bench/redis client: TASKS tasks share one connection, each doing SET then GET of a
-- 32-byte value until OPS operations are done. Prints "ops seconds".
local mw = require "moonwire"
local redis = require "moonwire.redis"
local port, tasks, ops, size = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4])
local value = ("v"):rep(size)
mw.run(function()
  local r = assert(redis.connect { port = port })
  local per = ops // (2 * tasks)
  local t0 = mw.now()
  local ts = {}
  for i = 1, tasks do
    ts[i] = mw.spawn(function()
      local key = "bench:" .. i
      for _ = 1, per do
        assert(r:set(key, value) == "OK")
        assert(r:get(key) == value)
      end
    end)
  end
  for i = 1, tasks do assert(ts[i]:join()) end
  print(per * 2 * tasks, mw.now() - t0)
  r:close()
end)
