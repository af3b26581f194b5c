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

--- Reads back what encode() wrote, and nothing else: the text may come from the network (a
-- distributed run's Redis), so it is parsed as data (no load(): a text that runs could loop,
-- or build a string of any size in a few instructions). Raises on anything encode() does not
-- write.
local byte, find, sub, char = string.byte, string.find, string.sub, string.char

local function bad(pos) error(("serial: not data at byte %d"):format(pos), 0) end

-- A %q string from its opening quote at pos -> the string, the position after it.
local function qstring(s, pos)
  local parts, n = {}, 0
  pos = pos + 1
  while true do
    local e = find(s, '[\\"]', pos)
    if not e then bad(pos) end
    if e > pos then n = n + 1; parts[n] = sub(s, pos, e - 1) end
    if byte(s, e) == 34 then return table.concat(parts), e + 1 end
    local c = byte(s, e + 1)
    if c == 34 or c == 92 or c == 10 then            -- \" \\ and \ newline
      n = n + 1; parts[n] = char(c)
      pos = e + 2
    else
      local d = s:match("^%d%d?%d?", e + 1)            -- \ddd
      if not d or tonumber(d) > 255 then bad(e) end
      n = n + 1; parts[n] = char(tonumber(d))
      pos = e + 1 + #d
    end
  end
end

local WORDS = { ["true"] = true, ["false"] = false, ["math.huge"] = math.huge,
  ["-math.huge"] = -math.huge, ["math.mininteger"] = math.mininteger }

local value
function value(s, pos, depth)
  local c = byte(s, pos)
  if c == 123 then                                    -- { [k]=v, ... }
    if depth > 64 then bad(pos) end
    local t = {}
    pos = pos + 1
    while byte(s, pos) == 91 do
      local k, v
      k, pos = value(s, pos + 1, depth + 1)
      if sub(s, pos, pos + 1) ~= "]=" or k == nil or k ~= k then bad(pos) end
      v, pos = value(s, pos + 2, depth + 1)
      if byte(s, pos) ~= 44 then bad(pos) end
      t[k] = v
      pos = pos + 1
    end
    if byte(s, pos) ~= 125 then bad(pos) end
    return t, pos + 1
  elseif c == 34 then
    return qstring(s, pos)
  end
  if sub(s, pos, pos + 4) == "(0/0)" then return 0 / 0, pos + 5 end
  if sub(s, pos, pos + 2) == "nil" then return nil, pos + 3 end
  local word = s:match("^%-?[%a%.]+", pos)
  if word and WORDS[word] ~= nil then return WORDS[word], pos + #word end
  local num = s:match("^%-?%d[%d%.eE%+%-]*", pos)
  local v = num and tonumber(num)
  if not v then bad(pos) end
  return v, pos + #num
end

function M.decode(s)
  if type(s) ~= "string" or sub(s, 1, 7) ~= "return " then bad(1) end
  local v, pos = value(s, 8, 0)
  if pos ~= #s + 1 then bad(pos) end
  return v
end

return M
