--- URLs: parsing (RFC 3986: userinfo, IPv6 literals, ports), percent-encoding, queries.
local M = {}

local default_ports = { http = 80, https = 443, ws = 80, wss = 443 }
M.default_ports = default_ports

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

--- Percent-decodes s (and "+" as space when `form` is set).
function M.decode(s, form)
  if form then s = s:gsub("+", " ") end
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- Percent-encodes everything but RFC 3986 unreserved characters (and those in `keep`).
function M.encode(s, keep)
  local pattern = "[^%w%-%._~" .. (keep and keep:gsub("%p", "%%%0") or "") .. "]"
  return (s:gsub(pattern, function(c) return ("%%%02X"):format(c:byte()) end))
end

--- Builds a query string from a table: {a = 1, b = {"x", "y"}} -> "a=1&b=x&b=y" (keys sorted).
function M.build_query(t)
  if type(t) ~= "table" then argerror(1, "build_query", "table expected, got " .. type(t)) end
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  local out = {}
  for _, k in ipairs(keys) do
    local v = t[k]
    if v == nil then v = t[tonumber(k)] end
    local list = type(v) == "table" and v or { v }
    for _, item in ipairs(list) do
      local ti = type(item)
      if ti ~= "string" and ti ~= "number" and ti ~= "boolean" then
        -- (a nested table or a function went out as its address)
        argerror(1, "build_query", "value of '" .. k .. "' is a " .. ti
          .. " (string, number, boolean or a list of them expected)")
      end
      if item == true then
        out[#out + 1] = M.encode(k)
      elseif item ~= false then
        out[#out + 1] = M.encode(k) .. "=" .. M.encode(tostring(item))
      end
    end
  end
  return table.concat(out, "&")
end

--- Parses a query string into a table (repeated keys -> arrays).
function M.parse_query(s)
  local t = {}
  for pair in s:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k, v = M.decode(k, true), M.decode(v, true)
    local old = t[k]
    if old == nil then t[k] = v
    elseif type(old) == "table" then old[#old + 1] = v
    else t[k] = { old, v } end
  end
  return t
end

-- Whether s is a dotted IPv4 address: four decimal octets, 0..255, no leading zeros (which
-- some resolvers read as octal), as inet_pton takes it.
local function ipv4_ok(s)
  local n = 0
  for octet in (s .. "."):gmatch("([^.]*)%.") do
    n = n + 1
    if not octet:match("^%d%d?%d?$") or (#octet > 1 and octet:sub(1, 1) == "0") or tonumber(octet) > 255 then
      return false
    end
  end
  return n == 4
end

-- The number of 16-bit groups in one side of an IPv6 address's "::" (0 for ""), or nil when
-- a group is malformed; with `last`, the final group may be a dotted IPv4 address (two).
local function ipv6_groups(s, last)
  if s == "" then return 0 end
  local n, parts = 0, {}
  for g in (s .. ":"):gmatch("([^:]*):") do parts[#parts + 1] = g end
  for i, g in ipairs(parts) do
    if last and i == #parts and g:find(".", 1, true) then
      if not ipv4_ok(g) then return nil end
      n = n + 2
    elseif g:match("^%x%x?%x?%x?$") then
      n = n + 1
    else
      return nil
    end
  end
  return n
end

-- Whether s is an IPv6 address in RFC 4291 §2.2 text form: eight groups of 1-4 hex digits,
-- one "::" standing for one or more zero groups, the last 32 bits as a dotted IPv4 address
-- allowed (::ffff:1.2.3.4). A bracketed host that is no such address ("[127.1]", "[1]") is
-- refused: it would otherwise be looked up, and connected to, as an IPv4 address.
local function ipv6_ok(s)
  local head, tail = s:match("^(.-)::(.*)$")
  if not head then return ipv6_groups(s, true) == 8 end
  if tail:find("::", 1, true) then return false end
  local a, b = ipv6_groups(head, false), ipv6_groups(tail, true)
  return a ~= nil and b ~= nil and a + b <= 7
end

--- The URL s as a message may show it: a userinfo's password and
-- the values of password= query parameters replaced by "***" (messages end up in logs).
function M.redact(s)
  return (s:gsub("(//[^/?#@]-:)[^/?#]*@", "%1***@"):gsub("([?&]password=)[^&#]*", "%1***"))
end
local redact = M.redact

--- Parses an absolute URL. Returns a table {scheme, user, password, host, port (number,
-- the scheme's default when absent), path ("/" when empty), query (or nil), fragment,
-- target (path [+ "?" query]), authority ("host[:port]" as the Host header wants it),
-- ipv6 (true for a bracketed literal)}, or nil, err.
function M.parse(s)
  if type(s) ~= "string" then argerror(1, "parse", "string expected, got " .. type(s)) end
  if s:find("[%z%s%c]") then return nil, "invalid URL (spaces or control characters): " .. redact(s) end
  local scheme, rest = s:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then return nil, "invalid URL (no scheme://): " .. redact(s) end
  scheme = scheme:lower()
  local authority, tail = rest:match("^([^/?#]*)(.*)$")
  -- a browser reads "\" as "/" here (WHATWG URL): "http://a\@b/" is host a to it and host b
  -- to RFC 3986; refused, so that a filter and this client never disagree on the host
  if authority:find("\\", 1, true) then return nil, "invalid URL (a backslash in the authority): " .. redact(s) end
  local u = { scheme = scheme }
  local userinfo, hostport = authority:match("^(.*)@(.*)$")
  if userinfo then
    local user, pass = userinfo:match("^([^:]*):(.*)$")
    u.user = M.decode(user or userinfo)
    u.password = pass and M.decode(pass)
  else
    hostport = authority
  end
  local host, port
  if hostport:sub(1, 1) == "[" then
    host, port = hostport:match("^%[([%x:.]+)%]:?(%d*)$")
    if not host or not ipv6_ok(host) then return nil, "invalid IPv6 literal in URL: " .. redact(s) end
    u.ipv6 = true
  else
    host, port = hostport:match("^([^:]*):?(%d*)$")
    if not host then return nil, "invalid port in URL: " .. redact(s) end
  end
  if host == "" then return nil, "no host in URL: " .. redact(s) end
  u.host = host:lower()
  if port ~= "" then
    u.port = math.tointeger(tonumber(port))
    if not u.port or u.port < 1 or u.port > 65535 then return nil, "invalid port in URL: " .. redact(s) end
  else
    u.port = default_ports[scheme]
  end
  local before, fragment = tail:match("^([^#]*)#?(.*)$")
  local path, query = before:match("^([^?]*)%??(.*)$")
  u.path = path ~= "" and path or "/"
  u.query = before:find("?", 1, true) and query or nil
  u.fragment = tail:find("#", 1, true) and fragment or nil
  u.target = u.query and (u.path .. "?" .. u.query) or u.path
  local h = u.ipv6 and ("[" .. u.host .. "]") or u.host
  u.authority = (port ~= "" and u.port ~= default_ports[scheme]) and (h .. ":" .. u.port) or h
  return u
end

-- RFC 3986 5.2.4: removes "." and ".." segments from an absolute path.
local function remove_dots(path)
  local segs = {}
  for seg in (path .. "/"):gmatch("([^/]*)/") do segs[#segs + 1] = seg end
  local stack = { "" }
  for i = 2, #segs do
    local seg = segs[i]
    if seg == ".." then
      if #stack > 1 then stack[#stack] = nil end
    elseif seg ~= "." then
      stack[#stack + 1] = seg
    end
  end
  local last = segs[#segs]
  if last == "." or last == ".." then stack[#stack + 1] = "" end
  local p = table.concat(stack, "/")
  return p == "" and "/" or p
end

--- Resolves a reference (e.g. a Location header) against a base URL string (RFC 3986 5.2).
function M.resolve(base, ref)
  if ref:match("^%a[%w+.-]*:") then return ref end        -- absolute (any scheme)
  local b = assert(M.parse(base))
  local auth = b.user and (M.encode(b.user) .. (b.password and (":" .. M.encode(b.password)) or "") .. "@") or ""
  local origin = b.scheme .. "://" .. auth .. b.authority
  if ref:sub(1, 2) == "//" then return b.scheme .. ":" .. ref end
  local rpath, rrest = ref:match("^([^?#]*)(.*)$")
  local rquery = rrest:match("^%?([^#]*)")
  local rfrag = rrest:match("#(.*)$")
  local path, query
  if rpath == "" then
    path = b.path
    query = rquery or b.query
  elseif rpath:sub(1, 1) == "/" then
    path, query = remove_dots(rpath), rquery
  else
    path, query = remove_dots((b.path:match("^(.*/)") or "/") .. rpath), rquery
  end
  return origin .. path .. (query and ("?" .. query) or "") .. (rfrag and ("#" .. rfrag) or "")
end

return M
