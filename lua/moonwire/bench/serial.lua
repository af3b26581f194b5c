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

function M.decode(s)
  return assert(load(s, "=serial", "t", { math = math }))()
end

return M
