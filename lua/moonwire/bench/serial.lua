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
    if math.type(v) == "integer" then out[#out + 1] = ("%d"):format(v)
    elseif v ~= v then out[#out + 1] = "(0/0)"
    elseif v == math.huge then out[#out + 1] = "math.huge"
    elseif v == -math.huge then out[#out + 1] = "-math.huge"
    else out[#out + 1] = ("%.17g"):format(v) end
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

function M.decode(s)
  return assert(load(s, "=serial", "t", { math = math }))()
end

return M
