--- MIME types by file extension, for static files and `res:sendfile`, and the test the
-- server's gzip uses to decide whether a content type is worth compressing.
-- Owns only the table and two pure functions: no I/O, no content sniffing.
local lower, match, find = string.lower, string.match, string.find

local M = {}

local UTF8 = "; charset=utf-8"

--- Extension (lower case, without the dot) → Content-Type. Scripts may add entries.
M.types = {
  html = "text/html" .. UTF8, htm = "text/html" .. UTF8,
  css = "text/css" .. UTF8,
  js = "text/javascript" .. UTF8, mjs = "text/javascript" .. UTF8, -- RFC 9239
  json = "application/json" .. UTF8, map = "application/json" .. UTF8,
  txt = "text/plain" .. UTF8, md = "text/markdown" .. UTF8, csv = "text/csv" .. UTF8,
  xml = "application/xml", -- XML declares its own encoding
  svg = "image/svg+xml" .. UTF8,
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  webp = "image/webp", ico = "image/x-icon", avif = "image/avif",
  wasm = "application/wasm", pdf = "application/pdf",
  zip = "application/zip", gz = "application/gzip", tar = "application/x-tar",
  mp4 = "video/mp4", webm = "video/webm",
  mp3 = "audio/mpeg", ogg = "audio/ogg", wav = "audio/wav",
  woff = "font/woff", woff2 = "font/woff2", ttf = "font/ttf", otf = "font/otf",
}

M.default = "application/octet-stream"

--- The Content-Type for a file name or path, from its extension (case-insensitive).
-- Files without a known extension (including dot files like ".env") get `M.default`.
function M.type(path)
  local ext = match(path, "[^/]%.([^./]+)$")
  return ext and M.types[lower(ext)] or M.default
end

-- media types (parameters stripped, lower case) that compress well besides text/*
local COMPRESSIBLE = {
  ["application/json"] = true, ["application/javascript"] = true,
  ["application/x-javascript"] = true, ["application/xml"] = true,
  ["application/wasm"] = true, ["application/manifest+json"] = true,
}

--- Whether a Content-Type is worth gzipping: text/*, JSON, JavaScript, XML, SVG and other
-- +json / +xml types, WebAssembly. Images, media, fonts and archives are not.
function M.compressible(content_type)
  if type(content_type) ~= "string" then return false end
  local t = lower(match(content_type, "^%s*([^;%s]*)"))
  return find(t, "^text/") ~= nil or COMPRESSIBLE[t] == true
    or find(t, "%+json$") ~= nil or find(t, "%+xml$") ~= nil
end

return M
