-- http.serve{ workers = N } (docs/http.md): N forked workers share the port through
-- SO_REUSEPORT, a dead worker is restarted, SIGTERM stops them all and the supervisor exits.
-- The server runs in a child lua5.4 (it forks); this process is the client.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local readfile = helper.readfile

-- Starts the workers server in the background; returns port, supervisor pid, log path.
local function start_server(workers)
  local base = os.tmpname()
  local script, log = base .. ".lua", base .. ".log"
  local f = assert(io.open(script, "w"))
  f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath))
  f:write(([[
local core = require "moonwire.core"
local http = require "moonwire.http"
http.serve{ host = "127.0.0.1", port = 0, workers = %d,
  on_listen = function(info)
    io.stdout:write("listening ", info.port, " ", info.pid, "\n")
    io.stdout:flush()
  end,
  handler = function(_, res) res:send(tostring(core.getpid())) end }
io.stdout:write("supervisor done\n")
io.stdout:flush()
]]):format(workers))
  f:close()
  local preload = os.getenv("MW_ASAN_PRELOAD")
  local env = preload and ("env LD_PRELOAD=" .. preload .. " ") or ""
  assert(os.execute(("(%stimeout -k 1 60 lua5.4 %s >%s 2>&1 &)"):format(env, script, log)))
  local port, pid
  for _ = 1, 500 do
    local text = readfile(log) or ""
    port, pid = text:match("listening (%d+) (%d+)")
    if port then break end
    mw.sleep(0.01)
  end
  assert(port, "the workers server did not start: " .. (readfile(log) or ""))
  return tonumber(port), tonumber(pid), log, script
end

local children, alive = helper.children, helper.process_alive

describe("http.serve with workers", function()
  it("spreads connections over N worker processes, restarts a dead one, stops all on SIGTERM", function()
    run(function()
      local port, sup, log, script = start_server(2)
      finally(function()
        os.execute("kill -9 " .. sup .. " 2>/dev/null")
        os.remove(log)
        os.remove(script)
      end)
      local workers = children(sup)
      assert.equal(2, #workers)
      -- each request on a new connection: the kernel spreads them; both workers answer
      local seen = {}
      for _ = 1, 60 do
        local res = assert(http.request{ url = "http://127.0.0.1:" .. port .. "/", headers = { connection = "close" } })
        seen[tonumber(res:body())] = true
      end
      local answering = 0
      for _, w in ipairs(workers) do if seen[w] then answering = answering + 1 end end
      assert.equal(2, answering)
      -- a worker that dies is replaced by a new one
      os.execute("kill -9 " .. workers[1])
      local replaced
      for _ = 1, 300 do
        local now = children(sup)
        if #now == 2 and now[1] ~= workers[1] and now[2] ~= workers[1] then replaced = now break end
        mw.sleep(0.02)
      end
      assert.truthy(replaced, "the dead worker was not restarted")
      assert.matches("worker " .. workers[1] .. " exited", readfile(log))
      local res = assert(http.request{ url = "http://127.0.0.1:" .. port .. "/", headers = { connection = "close" } })
      assert.equal(200, res.status)
      -- SIGTERM: the workers stop gracefully, then the supervisor returns
      os.execute("kill -TERM " .. sup)
      for _ = 1, 500 do
        if not alive(sup) then break end
        mw.sleep(0.01)
      end
      assert.is_false(alive(sup))
      for _, w in ipairs(replaced) do assert.is_false(alive(w)) end
      assert.matches("supervisor done", readfile(log))
    end, 30)
  end)
end)

describe("the workers' pubsub bus (moonwire.pubsub.bus)", function()
  it("a hub stopped before its accept task first ran: the task ends quietly", function()
    -- (it called accept on the closed listener, which raised: run() reports a task's
    -- uncaught error)
    local bus = require "moonwire.pubsub.bus"
    run(function()
      local path = bus.hub_start()
      assert.truthy(path:find("/bus%.sock$"))
      bus.hub_stop()
      mw.sleep(0.01)
      assert.is_nil(io.open(path, "rb"))      -- its socket file is gone too
    end)
  end)
end)
