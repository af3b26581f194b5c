-- Regression (review #19, item 1): a heap use-after-free in the loop's dispatch.
--
-- Diagnosis: an event callback (net.c on_sock_event) fired a socket's watch by handing its
-- function to a worker task right away (mw_sched_dispatch). Starting a worker allocates, so
-- the collector could run inside the loop's batch of events, finalize and free a socket that
-- was dropped without close(), and the loop then handled that socket's event from the same
-- batch: a READ (and, in the normal build, a write) of freed memory. loop.h states the rule
-- (callbacks must not run Lua code that could free a handle); nothing enforced it.
--
-- The fix mends the mechanism: watches that fire during a batch are queued and run after
-- it (rt->after_poll), and the scheduler aborts if a task is made or dispatched while a
-- batch is being dispatched, so any callback that breaks the rule fails these tests
-- deterministically instead of corrupting memory now and then.
local helper = require "spec.helper"

-- Many watches fire in the same batch as the events of sockets dropped without close(),
-- with a collector eager enough to finalize (and in the unfixed core, free) them while the
-- batch is dispatched. Each watch function fails, so no worker goes idle: every firing
-- needs a new worker, which allocates.
local churn = [[
local mw = require "moonwire"
local core = require "moonwire.core"
local N, ROUNDS = ...
local function dropped()            -- a readable socket nobody references or closes
  local a, b = assert(mw.unix.pair())
  assert(b:write("y"))
  b:close()
end
local fired = 0
mw.run(function()
  mw.on_error(function() end)
  local ps = {}
  for i = 1, N do
    local a, b = assert(mw.unix.pair())
    ps[i] = { a, b }
    core.watch(a, function() fired = fired + 1 a:recv(10) error("no idle worker", 0) end)
  end
  for _ = 1, ROUNDS do
    collectgarbage("stop")
    for i = 1, N do assert(ps[i][2]:write("x")) end
    for _ = 1, 4 do dropped() end   -- their events come after the watches' in the batch
    collectgarbage("incremental", 0, 1000, 10)
    collectgarbage("restart")
    mw.sleep(0)
    collectgarbage("incremental", 200, 100, 13)
    for i = 1, N do core.watch(ps[i][1]) end
  end
  mw.sleep(0)
  for i = 1, N do core.unwatch(ps[i][1]) ps[i][1]:close() ps[i][2]:close() end
end)
print("fired " .. fired)
]]

describe("the loop's event batch", function()
  for _, n in ipairs { 10, 20, 40, 120 } do
    it(("runs no Lua while it holds handles: %d watches, dropped sockets, an eager collector"):format(n), function()
      local rounds = 10
      local out, how, code = helper.subprocess(("local N, ROUNDS = %d, %d\n"):format(n, rounds)
        .. churn:gsub("local N, ROUNDS = %.%.%.\n", ""), 60)
      assert.equal("exit", how, out)
      assert.equal(0, code, out)
      assert.not_matches("inside an event batch", out)
      assert.matches("fired " .. (n * rounds) .. "\n", out, 1, true)
    end)
  end

  it("a watch that fires keeps working when its socket is closed in the same turn", function()
    helper.run(function()
      local mw = helper.mw
      local core = require "moonwire.core"
      local a, b = assert(mw.unix.pair())
      local c, d = assert(mw.unix.pair())
      local got = mw.channel(4)
      core.watch(a, function() got:send { "a", pcall(a.recv, a, 10) } end)
      core.watch(c, function() got:send { "c", c:recv(10) } end)
      assert(b:write("1"))
      assert(d:write("2"))
      mw.sleep(0)                    -- both fire in one batch; a is closed before its turn
      a:close()
      local seen = {}
      for _ = 1, 2 do
        local r = assert(got:recv(5))
        seen[r[1]] = r
      end
      assert.same({ "c", "2" }, seen.c)
      assert.equal("a", seen.a[1])
      c:close()
      b:close()
      d:close()
    end)
  end)
end)
