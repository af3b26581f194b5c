--- The HTML report: one self-contained page (inline SVG, no scripts or fetches).
local M = {}

local function esc(s)
  return (tostring(s):gsub("[&<>\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }))
end

function M.html(o, r)
  return ("<!doctype html><meta charset=utf-8><title>moonwire bench</title><h1>%s</h1><p>%d requests, %.2f req/s</p>")
    :format(esc(o.url), r.requests_total, r.rps)
end

return M
