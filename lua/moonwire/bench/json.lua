--- A small JSON encoder (objects with sorted keys, arrays for sequences) for bench output.
local M = {}

-- markers: a JSON null (a table key that must appear), and a table that is always an array
M.null = setmetatable({}, { __name = "json.null" })
local array_mt = { __jsonarray = true }
function M.array(t) return setmetatable(t or {}, array_mt) end

local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
  ["\r"] = "\\r", ["\t"] = "\\t" }

local function str(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return escapes[c] or ("\\u%04x"):format(c:byte())
  end) .. '"'
end

local function is_array(t)
  local n = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 then return false end
    n = n + 1
  end
  return n == #t
end

local function enc(v, out)
  local t = type(v)
  if t == "nil" then out[#out + 1] = "null"
  elseif t == "boolean" then out[#out + 1] = tostring(v)
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then out[#out + 1] = "null"
    elseif math.type(v) == "integer" then out[#out + 1] = tostring(v)
    else out[#out + 1] = ("%.6g"):format(v) end
  elseif t == "string" then out[#out + 1] = str(v)
  elseif v == M.null then out[#out + 1] = "null"
  elseif t == "table" then
    if getmetatable(v) == array_mt and next(v) == nil then out[#out + 1] = "[]" return end
    if next(v) == nil then out[#out + 1] = "{}" return end
    if is_array(v) then
      out[#out + 1] = "["
      for i, x in ipairs(v) do
        if i > 1 then out[#out + 1] = "," end
        enc(x, out)
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        local x = v[k]
        if x == nil then x = v[tonumber(k)] end
        out[#out + 1] = str(k) .. ":"
        enc(x, out)
      end
      out[#out + 1] = "}"
    end
  else
    out[#out + 1] = str(tostring(v))
  end
end

function M.encode(v)
  local out = {}
  enc(v, out)
  return table.concat(out)
end

return M
