--- Number formatting in wrk's style (units, k/M suffixes) and duration parsing.
local M = {}

function M.time_us(us)
  if us >= 1e6 then return ("%.2fs"):format(us / 1e6) end
  if us >= 1e3 then return ("%.2fms"):format(us / 1e3) end
  return ("%.2fus"):format(us)
end

function M.metric(n)
  if n >= 1e9 then return ("%.2fG"):format(n / 1e9) end
  if n >= 1e6 then return ("%.2fM"):format(n / 1e6) end
  if n >= 1e3 then return ("%.2fk"):format(n / 1e3) end
  return ("%.2f"):format(n)
end

function M.bytes(n)
  if n >= 1024 ^ 3 then return ("%.2fGB"):format(n / 1024 ^ 3) end
  if n >= 1024 ^ 2 then return ("%.2fMB"):format(n / 1024 ^ 2) end
  if n >= 1024 then return ("%.2fKB"):format(n / 1024) end
  return ("%.2fB"):format(n)
end

local units = { us = 1e-6, ms = 1e-3, s = 1, m = 60, h = 3600 }

--- "10s", "500ms", "2m", "1h", "30" (seconds) -> seconds, or nil
function M.duration(s)
  if type(s) == "number" then return s end
  if type(s) ~= "string" then return nil end
  local n, u = s:match("^%s*([%d.]+)%s*(%a*)%s*$")
  n = tonumber(n)
  if not n then return nil end
  if u == "" then return n end
  local f = units[u:lower()]
  return f and n * f or nil
end

-- a threshold's units of time are case-sensitive: "1M" is no minute (it reads as a count)
local time_units = { us = 1e-6, ms = 1e-3, s = 1, m = 60, h = 3600 }

--- A threshold's time: "50ms", "1.5s", "2m", "100us", "1h", or a bare number, which is
-- milliseconds (in one process as in a scenario, whose duration trends are in ms)
-- -> seconds, or nil
function M.threshold_time(s)
  local n, u = s:match("^(%d*%.?%d+)%s*(%a*)$")
  n = tonumber(n)
  if not n then return nil end
  if u == "" then return n / 1000 end
  local f = time_units[u]
  return f and n * f or nil
end

--- A percentile's rank from "99", "99.9" (or "99_9"): 0 < p <= 100, or nil
function M.rank(s)
  local p = tonumber(s:match("^%d+[._]?%d*$") and s:gsub("_", ".") or nil)
  return p and p > 0 and p <= 100 and p or nil
end

--- "10k" -> 10000, "1.5M" -> 1500000, "200" -> 200
function M.count(s)
  if type(s) == "number" then return s end
  local n, u = tostring(s):match("^%s*([%d.]+)%s*([kKmMgG]?)%s*$")
  n = tonumber(n)
  if not n then return nil end
  local f = ({ [""] = 1, k = 1e3, K = 1e3, m = 1e6, M = 1e6, g = 1e9, G = 1e9 })[u]
  return n * f
end

return M
