--- Serializes plain values (nil, booleans, numbers, strings, tables of those) to Lua source
-- and back: how bench threads hand their results to the main state.
local M = {}

local function ser(v, out)
  local t = type(v)
  if t == "table" then
    out[#out + 1] = "{"
    for k, x in pairs(v) do
      out[#out + 1] = "["
      ser(k, out)
      out[#out + 1] = "]="
      ser(x, out)
      out[#out + 1] = ","
    end
    out[#out + 1] = "}"
  elseif t == "string" then
    out[#out + 1] = ("%q"):format(v)
  elseif t == "number" then
    if math.type(v) == "integer" then
      -- "-9223372036854775808" would read back as a float
      out[#out + 1] = v == math.mininteger and "math.mininteger" or ("%d"):format(v)
    elseif v ~= v then out[#out + 1] = "(0/0)"
    elseif v == math.huge then out[#out + 1] = "math.huge"
    elseif v == -math.huge then out[#out + 1] = "-math.huge"
    else
      local f = ("%.17g"):format(v)
      if not f:find("[%.eEn]") then f = f .. ".0" end   -- keep floats floats
      out[#out + 1] = f
    end
  elseif t == "boolean" or t == "nil" then
    out[#out + 1] = tostring(v)
  else
    error("cannot serialize a " .. t)
  end
end

function M.encode(v)
  local out = { "return " }
  ser(v, out)
  return table.concat(out)
end

-- Whether v is plain data encode() can write and decode() read back the same: no
-- functions, userdata, cycles or metatables (those carry behaviour), at most 32 deep.
local function plain(v, seen, depth)
  local t = type(v)
  if t == "table" then
    if seen[v] or depth > 32 or getmetatable(v) ~= nil then return false end
    seen[v] = true
    for k, x in next, v do
      if not plain(k, seen, depth + 1) or not plain(x, seen, depth + 1) then return false end
    end
    seen[v] = nil
    return true
  end
  return t == "string" or t == "number" or t == "boolean"
end

--- The globals of a state (G) that are plain data, as name -> value: what a bench thread's
-- script left behind for thread:get() in done(). Skips `skip[name]`, and values whose
-- encoding exceeds 1 MiB or would take the total past 4 MiB.
function M.globals(G, skip)
  local out, total = {}, 0
  for k, v in next, G do
    if type(k) == "string" and not (skip and skip[k]) and v ~= G and plain(v, {}, 0) then
      local n = #M.encode(v)
      if n <= 1048576 and total + n <= 4194304 then
        out[k], total = v, total + n
      end
    end
  end
  return out
end

--- Reads back what encode() wrote. The text may come from the network (Redis): it runs
-- with only `math` in reach and under an instruction budget (encode()'s output needs fewer
-- instructions than it has bytes), so `while true do end` raises instead of spinning.
-- (not the real `math`: a text that assigned to it would change the process's)
local CONSTS = { huge = math.huge, mininteger = math.mininteger }

function M.decode(s)
  local co = coroutine.create(assert(load(s, "=serial", "t", { math = setmetatable({}, { __index = CONSTS }) })))
  debug.sethook(co, function() error("serial: instruction limit exceeded (not data)", 0) end, "", 1000 + #s)
  local ok, v = coroutine.resume(co)
  if not ok then error(v, 0) end
  return v
end

return M
