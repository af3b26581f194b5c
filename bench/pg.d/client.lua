-- bench/pg.d/client.lua URL TASKS SECONDS QUERY [CONNS]
-- TASKS tasks run the prepared QUERY ("int": SELECT $1::int, "rows20": a 20-row SELECT)
-- for SECONDS on CONNS connections (default 1: all tasks pipelined on one); prints
-- "queries=N seconds=S cpu=C" with C this process's utime+stime over the run.
local mw = require "moonwire"
local pg = require "moonwire.pg"

local url, ntasks, secs, which, nconns = arg[1], tonumber(arg[2]) or 50, tonumber(arg[3]) or 5,
  arg[4] or "int", tonumber(arg[5]) or 1
local SQL = {
  int = "SELECT $1::int AS v",
  rows20 = "SELECT i, 'row number ' || i AS s FROM generate_series($1::int, $1::int + 19) i",
}

local function cpu()
  local f = assert(io.open("/proc/self/stat"))
  local s = f:read("a")
  f:close()
  local fields = {}
  for x in s:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  -- utime, stime are fields 14 and 15 of the line: 12 and 13 after "(comm) "
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

mw.run(function()
  local conns, stmts = {}, {}
  for i = 1, nconns do
    conns[i] = assert(pg.connect(url))
    stmts[i] = assert(conns[i]:prepare("q", SQL[which]))
  end
  local stop, n = false, 0
  local t0, c0 = mw.now(), cpu()
  local tasks = {}
  for i = 1, ntasks do
    local stmt = stmts[(i - 1) % nconns + 1]
    tasks[i] = mw.spawn(function()
      local k = i
      while not stop do
        local r = stmt:run(k)
        if not r then error("query failed") end
        n = n + 1
        k = k + 1
      end
    end)
  end
  mw.sleep(secs)
  stop = true
  for i = 1, ntasks do assert(tasks[i]:join()) end
  local dt, dc = mw.now() - t0, cpu() - c0
  print(("queries=%d seconds=%.3f cpu=%.3f"):format(n, dt, dc))
  for i = 1, nconns do conns[i]:close() end
end)
