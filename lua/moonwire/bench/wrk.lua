--- The environment wrk scripts run in, unchanged: the `wrk` table, the global hooks, and a
-- few LuaJIT-era compatibility names (unpack, loadstring, bit) Lua 5.4 lacks.
local core = require "moonwire.core"

local M = {}

local Addr = {}
Addr.__index = Addr
function Addr:__tostring()
  if self.host:find(":", 1, true) then return ("[%s]:%d"):format(self.host, self.port) end
  return ("%s:%d"):format(self.host, self.port)
end
M.Addr = Addr

-- LuaJIT's bit: every result is a signed 32-bit number
local function tobit(a)
  a = math.tointeger(a) or math.floor(a)
  a = a & 0xffffffff
  if a >= 0x80000000 then a = a - 0x100000000 end
  return a
end

local function new_bit()
  return {
    tobit = tobit,
    band = function(a, ...) a = tobit(a) for _, b in ipairs{ ... } do a = a & tobit(b) end return tobit(a) end,
    bor = function(a, ...) a = tobit(a) for _, b in ipairs{ ... } do a = a | tobit(b) end return tobit(a) end,
    bxor = function(a, ...) a = tobit(a) for _, b in ipairs{ ... } do a = a ~ tobit(b) end return tobit(a) end,
    bnot = function(a) return tobit(~tobit(a)) end,
    lshift = function(a, n) return tobit(tobit(a) << (n & 31)) end,
    rshift = function(a, n) return tobit((tobit(a) & 0xffffffff) >> (n & 31)) end,
    arshift = function(a, n) return tobit(tobit(a) >> (n & 31) | (tobit(a) < 0 and ~(0xffffffff >> (n & 31)) or 0)) end,
    rol = function(a, n) a = tobit(a) & 0xffffffff n = n & 31 return tobit((a << n) | (a >> (32 - n))) end,
    ror = function(a, n) a = tobit(a) & 0xffffffff n = n & 31 return tobit((a >> n) | (a << (32 - n))) end,
    bswap = function(a)
      a = tobit(a) & 0xffffffff
      return tobit(((a & 0xff) << 24) | ((a & 0xff00) << 8) | ((a >> 8) & 0xff00) | (a >> 24))
    end,
    tohex = function(a, n) return ("%0" .. (n or 8) .. "x"):format(tobit(a) & 0xffffffff) end,
  }
end

local services = { http = 80, https = 443, ws = 80, wss = 443 }

-- Lua 5.1's table.getn and table.maxn: LuaJIT (wrk's Lua) keeps them, and wrk scripts call
-- them (`table.getn(paths)`); harmless additions to the table library of the state
local function add_table_compat()
  if rawget(table, "getn") == nil then rawset(table, "getn", function(t) return #t end) end
  if rawget(table, "maxn") == nil then
    rawset(table, "maxn", function(t)
      local n = 0
      for k in pairs(t) do if type(k) == "number" and k > n then n = k end end
      return n
    end)
  end
end

--- The global environment for a script, with `wrk` filled from the target: `G` itself (a
-- bench thread's own state runs the script in its real globals, so thread:get/set reach
-- them) or a fresh table over _G.
function M.env(target, headers, thread, G)
  local env = G or setmetatable({}, { __index = _G })
  if not G then env._G = env end
  env.unpack = table.unpack
  env.loadstring = load
  env.bit = new_bit()
  env.setfenv = function(f, t) return f, t end
  add_table_compat()
  local wrk = {
    -- (the port as the URL spells it, a string, as wrk gives it)
    scheme = target.scheme, host = target.host, port = target.port_given and tostring(target.port_given),
    method = "GET", path = target.target, headers = {}, body = nil, thread = thread,
  }
  for k, v in pairs(headers or {}) do wrk.headers[k] = v end
  local host_line = "Host: " .. target.authority .. "\r\n"
  -- called for every request by request() hooks: no tables, one lower() only for names
  -- that could be Host or Content-Length
  function wrk.format(method, path, hdrs, body)
    local s = (method or wrk.method) .. " " .. (path or wrk.path) .. " HTTP/1.1\r\n"
    hdrs = hdrs or wrk.headers
    body = body or wrk.body
    local has_host, has_len = false, false
    local h = ""
    for k, v in pairs(hdrs) do
      k = tostring(k)
      local n = #k
      if n == 4 or n == 14 then
        local lk = k:lower()
        if lk == "host" then has_host = true elseif lk == "content-length" then has_len = true end
      end
      h = h .. k .. ": " .. tostring(v) .. "\r\n"
    end
    if not has_host then
      -- a table of the script's own without Host: wrk.headers' Host (-H Host: ...), as wrk's
      -- format takes it, else the URL's
      local line = host_line
      if hdrs ~= wrk.headers then
        for k, v in pairs(wrk.headers) do
          if type(k) == "string" and #k == 4 and k:lower() == "host" then line = "Host: " .. tostring(v) .. "\r\n" end
        end
      end
      s = s .. line
    end
    s = s .. h
    if body then
      if not has_len then s = s .. "Content-Length: " .. #body .. "\r\n" end
      return s .. "\r\n" .. body
    end
    return s .. "\r\n"
  end
  function wrk.lookup(host, service)
    local port = tonumber(service) or services[service] or 0
    local list, err = require("moonwire").resolve(host, math.tointeger(port))
    if not list then error("wrk.lookup: " .. tostring(err), 2) end
    local out = {}
    for i, a in ipairs(list) do out[i] = setmetatable({ host = a.host, port = a.port, family = a.family }, Addr) end
    return out
  end
  function wrk.connect(addr)
    local sock = require("moonwire").tcp.connect(addr.host, addr.port, { timeout = 2 })
    if sock then sock:close() return true end
    return false
  end
  env.wrk = wrk
  return env, wrk
end

--- Loads a script file into env (raises with the script's error).
function M.load(path, env)
  local chunk, err = loadfile(path, "t", env)
  if not chunk then error("cannot load script: " .. err, 0) end
  chunk()
end

M.count_requests = core.http_count

return M
