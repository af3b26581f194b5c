-- Names scripts written for wrk's LuaJIT use and Lua 5.4 lacks: unpack, loadstring, bit.
-- Top-level code runs in every state; done() reports what the main state computed, and
-- init() computes the same in each thread (a failure there would end the run).
-- luacheck: read globals unpack loadstring bit

local a, b, c = unpack({ 1, 2, 3 })
local answer = loadstring("return 6 * 7")()
local bits = {
  band = bit.band(0xff, 0x0f, 0x3c),
  bor = bit.bor(1, 2, 4),
  bxor = bit.bxor(5, 3),
  bnot = bit.bnot(0),
  lshift = bit.lshift(1, 4),
  rshift = bit.rshift(256, 4),
  arshift = bit.arshift(256, 4),
  tobit = bit.tobit(0xffffffff),
  tohex = bit.tohex(255),
}

function init()
  assert(unpack({ 7 }) == 7 and loadstring("return 1")() == 1 and bit.band(3, 1) == 1)
end

function done()
  print("@unpack=" .. a .. b .. c)
  print("@loadstring=" .. answer)
  for _, k in ipairs{ "band", "bor", "bxor", "bnot", "lshift", "rshift", "arshift", "tobit", "tohex" } do
    print(("@bit.%s=%s"):format(k, tostring(bits[k])))
  end
end
