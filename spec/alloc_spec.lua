-- The size-class allocator (src/alloc.c) the module installs in the Lua state: objects of
-- every size keep their contents through growth and shrinking across classes, blocks made
-- before it was installed are handed back to the previous allocator, each thread's state has
-- its own arena, and lua_close ends cleanly. Each case runs in a fresh lua5.4 process, with
-- the allocator and with MOONWIRE_ALLOC=system, and both must print the same checksums.
local helper = require "spec.helper"

-- Builds and checks strings, tables and closures of many sizes; prints a checksum.
local churn = [[
local before = {}
for i = 1, 200 do before[i] = ("b"):rep(i * 7) end    -- made by the previous allocator
local core = require "moonwire.core"
local sum = 0
local function add(s) for i = 1, #s, 97 do sum = (sum * 31 + s:byte(i)) % 1000000007 end end
for round = 1, 3 do
  local keep = {}
  for n = 1, 1500, 7 do
    local s = ("x"):rep(n) .. n                          -- strings across every class
    keep[#keep + 1] = s
    local t = {}
    for i = 1, n % 300 do t[i] = i end                   -- arrays grown through the classes
    for i = n % 300, 1, -1 do t[i] = nil end             -- and emptied
    local h = {}
    for i = 1, n % 90 do h["k" .. i] = i end             -- hash parts grown and rehashed
    local c = 0
    for _, v in pairs(h) do c = c + v end
    sum = (sum + c + #t) % 1000000007
  end
  for i = 1, #keep, 3 do keep[i] = nil end
  collectgarbage()                                      -- frees into the class lists
  for _, s in pairs(keep) do add(s) end
end
for i = 1, #before do
  assert(before[i] == ("b"):rep(i * 7), "a block made before the allocator changed")
  before[i] = nil                                       -- freed by the previous allocator
end
collectgarbage()
print("sum " .. sum .. " version " .. core.version)
]]

describe("the Lua state's allocator", function()
  it("keeps every object's contents across size classes, and lua_close ends cleanly", function()
    local out, how, code = helper.subprocess(churn, 60)
    assert.are.equal("exit", how)
    assert.are.equal(0, code, out)
    assert.is_truthy(out:match("^sum %d+ version"), out)
  end)

  it("is not installed with MOONWIRE_ALLOC=system, and both give the same results", function()
    local probe = "print(require('moonwire.core').allocator())\n"
    local a, ahow, acode = helper.subprocess(probe .. churn, 60, { MOONWIRE_ALLOC = "system" })
    local b, bhow, bcode = helper.subprocess(probe .. churn, 60)
    assert.are.same({ "exit", 0 }, { ahow, acode }, a)
    assert.are.same({ "exit", 0 }, { bhow, bcode }, b)
    local a_alloc, a_rest = a:match("^(%a+)\n(.*)$")
    local b_alloc, b_rest = b:match("^(%a+)\n(.*)$")
    assert.are.equal("system", a_alloc)
    -- sanitizer builds keep the system's allocator (ASan must see every block)
    assert.are.equal(os.getenv("MW_ASAN_PRELOAD") and "system" or "moonwire", b_alloc)
    assert.are.equal(a_rest, b_rest)
    assert.is_truthy(a_rest:match("^sum %d+"), a)
  end)

  it("gives each thread's state its own arena and frees it when the thread ends", function()
    local out, how, code = helper.subprocess([[
local mw = require "moonwire"
local core = require "moonwire.core"
local body = ]] .. ("%q"):format(churn:gsub("print%(", "return (")) .. [[

local results = {}
mw.run(function()
  for round = 1, 4 do                          -- states made and closed again and again
    local hs = {}
    for i = 1, 3 do
      hs[i] = core.thread()
      assert(hs[i]:start(body, ""))
    end
    for i = 1, 3 do
      local s, err = hs[i]:join()
      assert(s, err)
      results[#results + 1] = s
    end
  end
end)
for i = 2, #results do assert(results[i] == results[1], "threads disagree") end
print(#results .. " threads: " .. results[1])
]], 120)
    assert.are.equal("exit", how)
    assert.are.equal(0, code, out)
    assert.is_truthy(out:match("^12 threads: sum %d+"), out)
  end)
end)
