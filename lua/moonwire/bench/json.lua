--- A small JSON encoder (objects with sorted keys, arrays for sequences) for bench output.
local M = {}

-- markers: a JSON null (a table key that must appear), and a table that is always an array
M.null = setmetatable({}, { __name = "json.null" })
local array_mt = { __jsonarray = true }
function M.array(t) return setmetatable(t or {}, array_mt) end

local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
  ["\r"] = "\\r", ["\t"] = "\\t" }

-- JSON text is UTF-8: a byte that does not begin a valid UTF-8 sequence (a metric, check or
-- error named in another encoding) becomes U+FFFD, so the document stays valid
local function utf8_clean(s)
  if utf8.len(s) then return s end
  local out, i = {}, 1
  while i <= #s do
    if utf8.len(s, i, i) then   -- a valid sequence starts here: its lead byte gives its length
      local b = s:byte(i)
      local j = i + (b < 0x80 and 1 or b < 0xE0 and 2 or b < 0xF0 and 3 or 4)
      out[#out + 1] = s:sub(i, j - 1)
      i = j
    else
      out[#out + 1] = "\u{FFFD}"
      i = i + 1
    end
  end
  return table.concat(out)
end

local function str(s)
  return '"' .. utf8_clean(s):gsub('[%c"\\]', function(c)
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
