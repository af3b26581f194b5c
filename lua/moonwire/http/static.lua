--- Static files (docs/http.md "Static files"): a request path under a prefix → a file under a
-- directory, with validators (ETag, Last-Modified → 304), one byte range (206/416) and
-- `res:sendfile` for the body. Owns the path-safety rules: NUL, backslash and `..` are refused
-- before the file system is asked, and nothing whose real path (symlinks resolved) lies
-- outside the directory's real path is ever served. Never reads file contents itself.
-- Multi-range requests (`bytes=0-1,5-6`) get the whole file (200): allowed by RFC 9110.
local core = require "moonwire.core"
local mime = require "moonwire.http.mime"

local realpath, stat = core.realpath, core.stat
local find, sub, byte, match, gmatch, gsub, lower, format =
  string.find, string.sub, string.byte, string.match, string.gmatch, string.gsub, string.lower,
  string.format

local SLASH = 47
local NOT_FOUND = "Not Found\n"
local NOHEADERS = {}

local M = {}

local function plain(res, code, body)
  res:status(code)
  res:header("content-type", "text/plain; charset=utf-8")
  res:send(body)
end

-- Nothing to serve here: the next handler if there is one, else 404.
local function miss(res, nxt)
  if nxt then return nxt() end
  return plain(res, 404, NOT_FOUND)
end

-- Dates: IMF-fixdate out (built from tables, so the C locale does not matter); the three
-- formats RFC 9110 5.6.7 says recipients must accept, in.
local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" }
local MONTH = {}
for i, m in ipairs(MONTHS) do MONTH[m] = i end

local function http_date(t)
  local d = os.date("!*t", t)
  return format("%s, %02d %s %04d %02d:%02d:%02d GMT",
    DAYS[d.wday], d.day, MONTHS[d.month], d.year, d.hour, d.min, d.sec)
end

-- Seconds since the epoch for a UTC civil time (days-from-civil, no os.time: that is local).
local function epoch(y, mon, d, hh, mm, ss)
  local m = MONTH[mon]
  y, d, hh, mm, ss = tonumber(y), tonumber(d), tonumber(hh), tonumber(mm), tonumber(ss)
  if not m or d < 1 or d > 31 or hh > 23 or mm > 59 or ss > 60 then return nil end
  if m <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * ((m + 9) % 12) + 2) // 5 + d - 1
  local days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
  return ((days * 24 + hh) * 60 + mm) * 60 + ss
end

local DATE_FORMATS = {
  function(s) -- IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
    local d, mon, y, hh, mm, ss = match(s, "^%a%a%a, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
    return d and epoch(y, mon, d, hh, mm, ss)
  end,
  function(s) -- RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
    local d, mon, y, hh, mm, ss = match(s, "^%a+, (%d%d)%-(%a%a%a)%-(%d%d) (%d%d):(%d%d):(%d%d) GMT$")
    if not d then return nil end
    y = tonumber(y)
    return epoch(y + (y < 70 and 2000 or 1900), mon, d, hh, mm, ss)
  end,
  function(s) -- asctime: Sun Nov  6 08:49:37 1994
    local mon, d, hh, mm, ss, y = match(s, "^%a%a%a (%a%a%a) +(%d%d?) (%d%d):(%d%d):(%d%d) (%d%d%d%d)$")
    return mon and epoch(y, mon, d, hh, mm, ss)
  end,
}

local function parse_date(s)
  s = match(s, "^%s*(.-)%s*$")
  for _, parse in ipairs(DATE_FORMATS) do
    local t = parse(s)
    if t then return t end
  end
end

-- The request path relative to the prefix ("" or "/…"), or nil when it is not under it.
local function relative(h, path)
  if type(path) ~= "string" or byte(path) ~= SLASH then return nil end
  local n = h.plen
  if n == 0 then return path end
  if sub(path, 1, n) ~= h.prefix then return nil end
  local c = byte(path, n + 1)
  if c == nil then return "" end
  if c == SLASH then return sub(path, n + 1) end
end

-- Refuses what could step outside the directory before the file system sees it: NUL,
-- backslash, a `..` segment in the decoded path; encoded dots, slashes, backslashes or NULs
-- in the raw target's path (should a decoder upstream ever change, these still fail).
local ENCODED = { "%2e%2e", "%2e.", ".%2e", "%2f", "%5c", "%00" }

local function unsafe(rel, target)
  if find(rel, "\0", 1, true) or find(rel, "\\", 1, true) or find(rel .. "/", "/%.%./") then
    return true
  end
  if type(target) == "string" and find(target, "%", 1, true) then
    local p = lower(match(target, "^[^?#]*"))
    for _, s in ipairs(ENCODED) do
      if find(p, s, 1, true) then return true end
    end
  end
  return false
end

-- The directory's real path is cached; when a file seems to be outside it, it is looked up
-- once more, so a directory that appears later or a deploy that swaps a symlink still works.
local function refresh(h)
  local r = realpath(h.dir)
  h.root, h.rootslash = r, r and (r == "/" and "/" or r .. "/")
  return r
end

local function inside(h, real)
  local r = h.root
  return r ~= nil and (real == r or sub(real, 1, #h.rootslash) == h.rootslash)
end

-- real path, size, mtime, kind of `path` if it exists inside the directory, else nil; nil
-- too, unless dotfiles, when its real path below the directory has a hidden segment (a
-- symlink "envlink" → ".env" must not serve .env)
local function resolve(h, path)
  local real = realpath(path)
  if not real then return nil end
  if not inside(h, real) then
    local old = h.root
    if refresh(h) == old or not inside(h, real) then return nil end
  end
  if not h.dotfiles and find(real, "/.", #h.rootslash, true) then return nil end
  local size, mtime, kind = stat(real)
  if not size then return nil end
  return real, size, mtime, kind
end

-- "/dir" → 301 "/dir/", built from the raw target (still percent-encoded, query kept) with
-- leading slashes collapsed, so "//evil.example" cannot become a protocol-relative URL.
local function redirect_dir(req, res)
  local target = req.target
  local path, query
  if type(target) == "string" and target ~= "" then
    target = gsub(target, "^%a[%w+.-]*://[^/?#]*", "") -- absolute-form → origin-form
    path, query = match(target, "^([^?#]*)(.*)$")
  else
    path, query = gsub(req.path, "[^%w%-._~!$&'()*+,;=:@/]", function(c)
      return format("%%%02X", byte(c))
    end), ""
  end
  path = gsub(path, "^/+", "/")
  return res:redirect(path .. "/" .. query, 301)
end

-- Whether the path of the request's target (origin- or absolute-form) ends in "/"; true
-- when there is no target to ask.
local function target_ends_in_slash(req)
  local target = req.target
  if type(target) ~= "string" or target == "" then return true end
  local path = match(gsub(target, "^%a[%w+.-]*://[^/?#]*", ""), "^[^?#]*")
  return byte(path, -1) == SLASH
end

-- If-Match (strong comparison: ours are weak entity tags, so only "*" matches a file that
-- exists) wins over If-Unmodified-Since (the file has not changed after that date; a bad
-- date is ignored): true when the request's precondition fails (412), RFC 9110 13.2.2.
local function precondition_failed(headers, mtime)
  local im = headers["if-match"]
  if im then return not find(im, "^%s*%*%s*$") end
  local ius = headers["if-unmodified-since"]
  if ius then
    local t = parse_date(ius)
    return t ~= nil and mtime > t
  end
  return false
end

-- If-None-Match ("*" or a list of entity tags, weak comparison: W/ ignored) wins over
-- If-Modified-Since (a date at or after the file's mtime), RFC 9110 13.2.2.
local function not_modified(headers, opaque, mtime)
  local inm = headers["if-none-match"]
  if inm then
    if find(inm, "^%s*%*%s*$") then return true end
    if not opaque then return false end
    for tag in gmatch(inm, '"([^"]*)"') do
      if tag == opaque then return true end
    end
    return false
  end
  local ims = headers["if-modified-since"]
  if ims then
    local t = parse_date(ims)
    return t ~= nil and mtime <= t
  end
  return false
end

-- If-Range (RFC 9110 13.1.5): an entity tag must match strongly, and ours are weak, so an
-- entity tag never matches (the whole file is sent); a date must equal Last-Modified.
local function range_applies(value, mtime)
  if not value then return true end
  if find(value, '^%s*W?/?"') then return false end
  return parse_date(value) == mtime
end

-- One byte range: offset, length; false when unsatisfiable; nil when the header is to be
-- ignored (malformed, or several ranges).
local function parse_range(value, size)
  local spec = match(value, "^%s*[Bb][Yy][Tt][Ee][Ss]=%s*(.-)%s*$")
  if not spec or find(spec, ",", 1, true) then return nil end
  local a, b = match(spec, "^(%d*)%s*%-%s*(%d*)$")
  if not a or (a == "" and b == "") then return nil end
  if a == "" then -- suffix: the last b bytes
    local n = tonumber(b)
    if n == 0 then return false end
    if n > size then n = size end
    return size - n, math.tointeger(n)
  end
  local first, last = tonumber(a), tonumber(b)
  if last and last < first then return nil end
  if first >= size then return false end
  if not last or last >= size then last = size - 1 end
  return first, last - first + 1
end

local function validators(h, res, etag, modified)
  if etag then res:header("etag", etag) end
  res:header("last-modified", modified)
  if h.cache_control then res:header("cache-control", h.cache_control) end
end

local function send(h, req, res, real, name, size, mtime)
  local headers = req.headers or NOHEADERS
  local opaque = h.etag and format("%x-%x", size, mtime) or nil
  local etag = opaque and 'W/"' .. opaque .. '"'
  local modified = http_date(mtime)
  if precondition_failed(headers, mtime) then
    res:status(412)
    return res:send()
  end
  if not_modified(headers, opaque, mtime) then
    res:status(304)
    validators(h, res, etag, modified)
    return res:send()
  end
  local offset, length = 0, size
  local range = headers.range
  -- Range is defined for GET only (HEAD gets the 200 head); an empty file has no ranges
  if range and req.method == "GET" and size > 0 and range_applies(headers["if-range"], mtime) then
    local first, n = parse_range(range, size)
    if first == false then
      res:status(416)
      res:header("content-range", format("bytes */%d", size))
      return res:send()
    elseif first then
      offset, length = first, n
      res:status(206)
      res:header("content-range", format("bytes %d-%d/%d", first, first + n - 1, size))
    end
  end
  res:header("content-type", mime.type(name))
  validators(h, res, etag, modified)
  res:header("accept-ranges", "bytes")
  -- (the range is from this stat: a file that shrinks or goes before sendfile opens it is
  -- abandoned, not a misuse that raises, and one it cannot open gets a 500; response.lua's
  -- sendfile_range)
  res._stat_range = true
  return res:sendfile(real, offset, length)
end

-- hidden files (.env, .git/...) are not served unless asked for: a segment that starts with
-- "." and is not "." itself (which names no file; ".." is refused by `unsafe`); what a
-- symlink leads to is checked on the real path (resolve)
local function hidden(h, rel)
  return not h.dotfiles and find(rel, "/%.[^/]") ~= nil
end

-- Whether a GET of `rel` would be answered from a file (a file, or a directory's index).
local function exists(h, req, rel)
  if unsafe(rel, req.target) or hidden(h, rel) then return false end
  local real, _, _, kind = resolve(h, h.dir .. rel)
  if kind == "dir" and h.index then
    _, _, _, kind = resolve(h, real .. "/" .. h.index)
  end
  return kind == "file"
end

-- Another method than GET or HEAD: 405 for a file that exists (RFC 9110 §15.5.6), else a
-- miss. With `next` (a router) the request goes on, for a later mount or route may take that
-- method; GET and HEAD are recorded in req._allow, which the router's 405 merges into Allow.
local function other_method(h, req, res, nxt, rel)
  if not exists(h, req, rel) then return miss(res, nxt) end
  if nxt then
    local allow = rawget(req, "_allow")
    if not allow then
      allow = {}
      rawset(req, "_allow", allow)
    end
    allow.GET, allow.HEAD = true, true
    return nxt()
  end
  res:header("allow", "GET, HEAD")
  return plain(res, 405, "Method Not Allowed\n")
end

local function serve(h, req, res, nxt)
  local rel = relative(h, req.path)
  if not rel then return miss(res, nxt) end
  local method = req.method
  if method ~= "GET" and method ~= "HEAD" then return other_method(h, req, res, nxt, rel) end
  if unsafe(rel, req.target) then return plain(res, 404, NOT_FOUND) end
  if hidden(h, rel) then return miss(res, nxt) end
  local name = h.dir .. rel
  local real, size, mtime, kind = resolve(h, name)
  if kind == "dir" then
    -- (the request's own path decides: a router mounted at /docs hands "/docs" in as "/")
    if byte(rel, -1) ~= SLASH or not target_ends_in_slash(req) then return redirect_dir(req, res) end
    if not h.index then return miss(res, nxt) end
    name = h.index
    real, size, mtime, kind = resolve(h, real .. "/" .. name)
  end
  if kind ~= "file" then return miss(res, nxt) end
  return send(h, req, res, real, name, size, mtime)
end

-- Options: name → check(value) returning the value to keep, or nil and what was expected.
local OPTIONS = {
  index = function(v)
    if v == false or (type(v) == "string" and find(v, "^[^/\\\0]+$") and v ~= "." and v ~= "..") then
      return v
    end
    return nil, "file name or false"
  end,
  max_age = function(v)
    local n = math.type(v) and math.tointeger(v)
    if n and n >= 0 then return n end
    return nil, "non-negative integer"
  end,
  etag = function(v)
    if type(v) == "boolean" then return v end
    return nil, "boolean"
  end,
  dotfiles = function(v)
    if type(v) == "boolean" then return v end
    return nil, "boolean"
  end,
}

local function bad(level, n, fname, msg)
  error(format("bad argument #%d to '%s' (%s)", n, fname, msg), level + 1)
end

local function trim_slash(s)
  if #s > 1 and byte(s, -1) == SLASH then return (gsub(s, "/+$", "")) end
  return s
end

--- For `app:static` and `handler`: checks the arguments (errors name `fname`, raised at
-- `level` as seen from here) and returns the handler function(req, res [, next]).
function M.build(level, fname, prefix, dir, opts)
  if type(prefix) ~= "string" then bad(level, 1, fname, "string expected, got " .. type(prefix)) end
  if byte(prefix) ~= SLASH then bad(level, 1, fname, "prefix must start with '/', got '" .. prefix .. "'") end
  if type(dir) ~= "string" then bad(level, 2, fname, "string expected, got " .. type(dir)) end
  if dir == "" or find(dir, "\0", 1, true) then bad(level, 2, fname, "directory path expected") end
  if opts ~= nil and type(opts) ~= "table" then bad(level, 3, fname, "table expected, got " .. type(opts)) end
  local h = { index = "index.html", max_age = 0, etag = true, dotfiles = false }
  for k, v in pairs(opts or {}) do
    local check = OPTIONS[k]
    if not check then bad(level, 3, fname, format("unknown option '%s'", tostring(k))) end
    local value, want = check(v)
    if value == nil then
      bad(level, 3, fname, format("option '%s': %s expected, got %s", k, want, tostring(v)))
    end
    h[k] = value
  end
  prefix = trim_slash(prefix)
  if prefix == "/" then prefix = "" end
  h.prefix, h.plen, h.dir = prefix, #prefix, trim_slash(dir)
  h.cache_control = h.max_age > 0 and format("public, max-age=%d", h.max_age) or nil
  refresh(h)
  return function(req, res, nxt) return serve(h, req, res, nxt) end
end

--- static.handler(prefix, dir [, opts]) → function(req, res [, next]); opts: index
-- ("index.html"; false: no index files), max_age (0; > 0 adds Cache-Control), etag (true),
-- dotfiles (false: names starting with "." are not served, nor what a symlink leads to
-- when its real path below the directory has such a name).
-- With `next`, a missing file or another method calls it instead of answering 404/405
-- (another method on a file that exists: after recording GET and HEAD in req._allow, for
-- the router's 405).
function M.handler(prefix, dir, opts)
  local fn = M.build(3, "handler", prefix, dir, opts)
  return fn
end

return M
