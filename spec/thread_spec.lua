-- core.thread and core.counters (src/thread.c), the load generator's threads: shared
-- counters stay valid while a thread views them; a start that fails leaves nothing behind.
-- The failure is made with a preloaded pthread_create that fails
-- (spec/fixtures/fail-shim.c) in a child process, so not under ASan (whose interceptors
-- come first).

local helper = require "spec.helper"

local mw = helper.mw
local core = require "moonwire.core"
local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."

describe("core.thread", function()
  -- Regression: the counters block belonged to its creator alone, so when `moonwire bench`
  -- gave up on a run (one thread failed) while other threads ran, collecting the creator's
  -- object freed the cells those threads went on writing (and malloc's free list then sat
  -- in them). Now every view holds the block; the last one frees it.
  it("counters stay valid for a thread after the creator's view is collected", function()
    helper.run(function()
      local shared = core.counters(4)
      local h = core.thread()
      assert(h:start([[
local core = require "moonwire.core"
local c = core.counters_attach(math.tointeger(tonumber(...)), 4)
c:set(1, 12345)
c:set(3, 67890)
c:set(2, 1)                                      -- written
while c:get(4) == 0 do end                       -- until the creator let go (set before)
local t0 = core.hrtime()
while core.hrtime() - t0 < 2e8 do end            -- 0.2 s for the collection
return c:get(1) .. " " .. c:get(3)
]], tostring(shared:address())))
      local deadline = mw.now() + 5
      while shared:get(2) == 0 and mw.now() < deadline do mw.sleep(0.002) end
      assert.equal(1, shared:get(2))
      shared:set(4, 1)
      shared = nil   -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert.equal("12345 67890", h:join())
    end)
  end)

  -- A thread that returns its argument once cell 1 of the counters is set (at most 10 s).
  local GATED = [[
local core = require "moonwire.core"
local c = core.counters_attach(math.tointeger(tonumber(...)), 1)
local t0 = core.hrtime()
while c:get(1) == 0 and core.hrtime() - t0 < 1e10 do end
return "done"
]]
  local function gated_thread()
    local gate = core.counters(1)
    local h = core.thread()
    assert(h:start(GATED, tostring(gate:address())))
    return h, gate
  end
  local function until_waiting(...)
    for _, task in ipairs({ ... }) do
      while task:status() ~= "waiting" do mw.yield() end
    end
  end

  -- Regression (review): the thread kept one waiting task; a second join() overwrote it, so
  -- the first joiner was never woken (and mw.run never ended). Now every joiner is woken.
  it("wakes every task that joins it", function()
    helper.run(function()
      local h, gate = gated_thread()
      local a = mw.spawn(function() return h:join() end)
      local b = mw.spawn(function() return h:join() end)
      until_waiting(a, b)
      gate:set(1, 1)
      assert.same({ true, "done" }, { b:join() })
      assert.same({ true, "done" }, { a:join() })
    end)
  end)

  -- Regression (review): cancelling one joiner cleared the only waiter slot, so the other
  -- joiner was never woken.
  it("a cancelled joiner leaves the other joiners waiting for the result", function()
    helper.run(function()
      local h, gate = gated_thread()
      local a = mw.spawn(function() return h:join() end)
      local b = mw.spawn(function() return h:join() end)
      until_waiting(a, b)
      assert.is_true(b:cancel())
      local _, msg, code = select(2, b:join())
      assert.equal("cancelled", code, msg)
      gate:set(1, 1)
      assert.same({ true, "done" }, { a:join() })
    end)
  end)

  -- Regression (review): a joiner woken before the thread ended (the eventfd's first
  -- writable edge) waited again with no deadline: join(timeout) then never timed out.
  it("join(timeout) times out although the joiner was woken early", function()
    helper.run(function()
      local h, gate = gated_thread()
      helper.fails("timeout", h:join(0.05))
      gate:set(1, 1)
      assert.equal("done", h:join())
    end)
  end)

  -- Regression (review): copy_value (t:set, t:get) checked for stack room on the state it
  -- copied to only, while each table level pushes lua_next's key and value on the state it
  -- copies from: from depth 15 it wrote past the caller's Lua stack (a hang at 15, a
  -- segfault at 30). Now both states are checked; past 32 levels set and get raise. In a
  -- child process, as the old code took the process down; each copy is made from a fresh
  -- coroutine (a stack of 40 slots) with the system allocator, whose block headers right
  -- after the stack made the overflow a crash every time.
  it("tables nested up to 32 levels cross into and out of a thread; deeper ones raise", function()
    local out, how, status = helper.subprocess([[
local core = require "moonwire.core"
local function nest(d)
  local t = {}
  local c = t
  for _ = 1, d do c.x = {}; c = c.x end
  c.v = "leaf"
  return t
end
local function depth(t)
  local d = 0
  while t.x do t = t.x; d = d + 1 end
  return d, t.v
end
for _, d in ipairs { 15, 30, 32 } do
  local h = core.thread()
  print("set/get", d, coroutine.wrap(function()
    h:set("deep", nest(d))
    return depth(h:get("deep"))
  end)())
end
local h = core.thread()
print("set 33", pcall(function() h:set("deep", nest(33)) end))
assert(h:start("deep = ...; for _ = 1, 40 do deep = { x = deep } end; return 'built'", "leaf"))
print("join", require("moonwire").run(function() return h:join() end))
print("get 40", pcall(function() return h:get("deep") end))
print("ok")
]], 20, { MOONWIRE_ALLOC = "system" })
    assert.equal("exit", how, out)
    assert.equal(0, status, out)
    for _, d in ipairs { 15, 30, 32 } do
      assert.matches(("set/get\t%d\t%d\tleaf\n"):format(d, d), out, 1, true)
    end
    assert.matches("set 33\tfalse\t[^\n]*bad argument #2 to 'set' %(tables nested deeper than 32 levels%)", out)
    assert.matches("join\tbuilt\n", out, 1, true)
    assert.matches("get 40\tfalse\t[^\n]*thread global 'deep': tables nested deeper than 32 levels", out)
  end)

  local shim
  teardown(function() if shim then os.remove(shim) end end)

  -- Regression: t:start copied the code and the argument into buffers before
  -- pthread_create; when that failed they stayed, and the next start (nothing was started,
  -- so a retry is allowed) replaced them without freeing: 2 MiB leaked per failed start here.
  it("a start that fails (pthread_create) returns nil, err, code and frees its copies", function()
    if os.getenv("MW_ASAN_PRELOAD") then pending("a preloaded pthread_create does not come before ASan's") return end
    shim = shim or helper.build_shim(SPEC_DIR .. "/fixtures/fail-shim.c")
    local out, how, status = helper.subprocess([[
local core = require "moonwire.core"
local function rss_kib()
  local f = assert(io.open("/proc/self/status"))
  local kib = tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kib
end
local code = "return ... --" .. ("x"):rep(1024 * 1024)
local arg = ("y"):rep(1024 * 1024)
local h = core.thread()
print("first", h:start(code, arg))
collectgarbage()
local before = rss_kib()
for _ = 1, 100 do assert(not h:start(code, arg)) end
collectgarbage()
print("growth_mib", (rss_kib() - before) // 1024)
]], 20, { LD_PRELOAD = shim, MW_FAIL_PTHREAD_CREATE = "1" })
    assert.equal("exit", how, out)
    assert.equal(0, status, out)
    assert.matches("first\tnil\tResource temporarily unavailable", out, 1, true)
    local growth = assert(math.tointeger(tonumber(out:match("growth_mib\t(%-?%d+)"))), out)
    assert.is_true(growth < 20, "RSS grew by " .. growth .. " MiB over 100 failed starts")
  end)
end)
