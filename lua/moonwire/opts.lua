--- moonwire.opts: what an option's value may be, defined once for every module's checks
-- (each module still words its own errors). Six modules had six ideas of a timeout: some
-- refused numeric strings, one took NaN.
local M = {}

--- A timeout or duration in seconds, as docs/api.md promises everywhere: a number or a
-- numeric string, not NaN. Returns the number, or nil.
function M.seconds(v)
  local n = tonumber(v)
  if n and n == n then return n end
  return nil
end

return M
