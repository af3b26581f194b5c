--- Router: method + path → handler, Koa-style middleware, mounted sub-routers and static
-- directories (docs/http.md "Router"). Patterns compile once into a segment trie; a request
-- walks it without building tables or closures (`req.params` aside), so the hot path is one
-- hash lookup for literal routes and a short walk for the others. A middleware chain costs
-- one small table per request; reaching mounts/static costs one closure (and a table per mount).
-- Order of a request: `use` middleware (in order) → routes → mounts and static directories
-- (in registration order) → 405 if a route matched the path or a static directory has a file
-- there → the caller's `next` → 404.
local static = require "moonwire.http.static"

local find, sub, byte, format = string.find, string.sub, string.byte, string.format
local concat, sort = table.concat, table.sort

local SLASH, COLON, STAR = 47, 58, 42

local Router = {}
Router.__index = Router
Router.__name = "moonwire.Router"

local function argerror(level, n, fname, msg)
  error(format("bad argument #%d to '%s' (%s)", n, fname, msg), level + 1)
end

local function checkself(self, fname)
  if getmetatable(self) ~= Router then
    error(format("calling '%s' on bad self (moonwire.Router expected, got %s)", fname, type(self)), 3)
  end
end

local function callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__call ~= nil
end

local function checkfn(level, n, fname, fn)
  if not callable(fn) then argerror(level + 1, n, fname, "function expected, got " .. type(fn)) end
end

local function checkpath(level, n, fname, s, what)
  if type(s) ~= "string" then argerror(level + 1, n, fname, "string expected, got " .. type(s)) end
  if byte(s) ~= SLASH then
    argerror(level + 1, n, fname, format("%s must start with '/', got '%s'", what, s))
  end
end

local function plain(res, code, body)
  res:status(code)
  res:header("content-type", "text/plain; charset=utf-8")
  res:send(body)
end

-- Trie nodes: `lit` maps a literal segment to a node, `param` is the node for a `:name`
-- segment, `splat` the method table of a `*name` tail, `methods` the method table of a
-- pattern ending here. A method table maps "GET"/"*"/… to { fn, names = {...}, splat = name }:
-- names are per route because two routes of one shape may name their parameters differently.
local function newnode() return { lit = {} } end

local function lookup(methods, method)
  local e = methods[method]
  if e then return e end
  if method == "HEAD" then
    e = methods.GET
    if e then return e end
  end
  return methods["*"]
end

-- Depth-first over the trie, literal before parameter before splat at each segment, so the
-- most specific route wins whatever the registration order; a branch that fails (no deeper
-- match, or no handler for this method) falls back to the next kind. Each node sits at a
-- fixed depth, so a walk visits a node at most once. `pos` is the first byte of the current
-- segment, `k` the number of parameters bound above. Parameters are written on the way back
-- up, only for the route that won.
local function walk(node, path, pos, method, k, params)
  local slash = find(path, "/", pos, true)
  local stop = slash and slash - 1 or #path
  local seg = sub(path, pos, stop)
  local child, e = node.lit[seg], nil
  if child then
    if slash then
      e = walk(child, path, slash + 1, method, k, params)
    elseif child.methods then
      e = lookup(child.methods, method)
    end
    if e then return e end
  end
  child = node.param
  if child and stop >= pos then -- a parameter is never empty
    if slash then
      e = walk(child, path, slash + 1, method, k + 1, params)
    elseif child.methods then
      e = lookup(child.methods, method)
    end
    if e then
      params[e.names[k + 1]] = seg
      return e
    end
  end
  local tail = node.splat
  if tail then
    e = lookup(tail, method)
    if e then
      params[e.splat] = sub(path, pos)
      return e
    end
  end
end

-- Same walk, collecting the methods of every route whose pattern matches (for 405 Allow).
local function collect(node, path, pos, set)
  local slash = find(path, "/", pos, true)
  local stop = slash and slash - 1 or #path
  local kids = { node.lit[sub(path, pos, stop)], stop >= pos and node.param or nil }
  for i = 1, 2 do
    local child = kids[i]
    if child then
      if slash then
        collect(child, path, slash + 1, set)
      elseif child.methods then
        for m in pairs(child.methods) do set[m] = true end
      end
    end
  end
  if node.splat then
    for m in pairs(node.splat) do set[m] = true end
  end
end

-- (with the methods a static directory found a file for: req._allow, static.lua)
local function allowed(self, req)
  local path, set = req.path, {}
  if byte(path) == SLASH then collect(self.root, path, 2, set) end
  local found = rawget(req, "_allow")
  if found then
    for m in pairs(found) do set[m] = true end
  end
  if set.GET then set.HEAD = true end
  local list = {}
  for m in pairs(set) do list[#list + 1] = m end
  sort(list)
  return list
end

-- The last stage: 405 when some route matches the path (or a static directory has a file
-- there), else the caller's `next`, else 404.
local function finish(self, req, res, outer)
  local allow = allowed(self, req)
  if #allow > 0 then
    res:header("allow", concat(allow, ", "))
    return plain(res, 405, "Method Not Allowed\n")
  end
  if outer then return outer() end
  return plain(res, 404, "Not Found\n")
end

-- Mounts and static directories, tried in registration order while each calls `next`.
-- `path` is tested against the prefix before the entry runs (no call for other paths).
local function under(path, fb)
  if not find(path, fb.pat) then return false end
  local c = byte(path, fb.len + 1)
  return c == nil or c == SLASH or fb.len == 0
end

local function fallbacks(self, req, res, outer)
  local list = self.fallbacks
  if #list == 0 then return finish(self, req, res, outer) end
  local i = 0
  local function nxt()
    while true do
      i = i + 1
      local fb = list[i]
      if not fb then return finish(self, req, res, outer) end
      if under(req.path, fb) then return fb.run(fb, req, res, nxt) end
    end
  end
  return nxt()
end

local function dispatch(self, req, res, outer)
  local path, method = req.path, req.method
  local methods = self.exact[path]
  local e = methods and lookup(methods, method)
  if not e and byte(path) == SLASH then e = walk(self.root, path, 2, method, 0, req.params) end
  if e then return e.fn(req, res) end
  return fallbacks(self, req, res, outer)
end

-- Koa-style chain. `next` is one callable table per request: { router, req, res, outer, pos }
-- (cheaper than a closure over five locals). `pos` is the middleware whose `next` is still
-- unused; once a `next` returns or raises, the chain behind it has run, and calling `next`
-- again is a bug that raises instead of running part of the chain twice (the table is its
-- own to-be-closed value: a raise marks it used too, for a middleware that pcall'd it).
local Next = {}
Next.__name = "moonwire.RouterNext"

Next.__close = function(nxt)
  nxt[5] = -1
end

Next.__call = function(nxt)
  local pos = nxt[5]
  if pos < 0 then error("next() called more than once", 2) end
  local _used <close> = nxt
  local self = nxt[1]
  local k = pos + 1
  nxt[5] = k
  local f = self.stack[k]
  if f then
    f(nxt[2], nxt[3], nxt)
  else
    dispatch(self, nxt[2], nxt[3], nxt[4])
  end
end

local function chain(self, req, res, outer)
  local nxt = setmetatable({ self, req, res, outer or false, 0 }, Next)
  return nxt()
end

--- Handles a request. `outer` (optional) is called instead of answering 404 when nothing
-- here matches the path: that is how a mounted router falls through to its parent.
function Router:handle(req, res, outer)
  -- (raw: __index would run at the top of this frame, and its frames could grow the stack of
  -- a task that then keeps it, as a WebSocket handler's does: docs/websocket.md)
  if not rawget(req, "params") then rawset(req, "params", {}) end
  if #self.stack == 0 then return dispatch(self, req, res, outer) end
  return chain(self, req, res, outer)
end

Router.__call = Router.handle

-- Registration. Public methods call `add` directly (never as a tail call), so error levels
-- count a fixed number of frames up to the caller's line: `argerror(level, ...)` takes the
-- level as seen from the function that calls it.
local function checkname(level, fname, n, pattern, name, seen)
  if not find(name, "^[%a_][%w_]*$") then
    argerror(level + 1, n, fname, format("bad parameter name '%s' in pattern '%s'", name, pattern))
  end
  if seen[name] then
    argerror(level + 1, n, fname, format("duplicate parameter '%s' in pattern '%s'", name, pattern))
  end
  seen[name] = true
end

-- Walks/extends the trie along `pattern`; returns the method table, names, splat name and
-- whether the pattern is all literal. `n` is the pattern's argument number (for messages).
local function compile(self, pattern, fname, n)
  local node, names, seen, literal = self.root, {}, {}, true
  local pos = 2
  while true do
    local slash = find(pattern, "/", pos, true)
    local seg = sub(pattern, pos, slash and slash - 1 or -1)
    local c = byte(seg)
    if c == COLON then
      local name = sub(seg, 2)
      checkname(4, fname, n, pattern, name, seen)
      names[#names + 1] = name
      node.param = node.param or newnode()
      node, literal = node.param, false
    elseif c == STAR then
      local name = sub(seg, 2)
      if slash then
        argerror(4, n, fname, format("splat '%s' must be the last segment of '%s'", seg, pattern))
      end
      checkname(4, fname, n, pattern, name, seen)
      node.splat = node.splat or {}
      return node.splat, names, name, false
    else
      local child = node.lit[seg] or newnode()
      node.lit[seg] = child
      node = child
    end
    if not slash then break end
    pos = slash + 1
  end
  node.methods = node.methods or {}
  return node.methods, names, nil, literal
end

local function add(self, method, pattern, fn, fname, n)
  checkpath(3, n, fname, pattern, "pattern")
  checkfn(3, n + 1, fname, fn)
  local methods, names, splat, literal = compile(self, pattern, fname, n)
  if methods[method] then
    error(format("route %s %s is already defined (same method and shape)", method, pattern), 3)
  end
  methods[method] = { fn = fn, names = names, splat = splat }
  if literal then self.exact[pattern] = methods end
end

--- app:route(method, pattern, fn); method "*" matches any method.
-- Trailing slashes are strict: "/a/" does not match "/a" (register both if both should
-- answer). A `:name` matches one non-empty segment; `*name` matches the rest of the path
-- after its "/" (possibly empty, slashes included), so "/f/*p" matches "/f/" but not "/f".
function Router:route(method, pattern, fn)
  checkself(self, "route")
  if type(method) ~= "string" then argerror(2, 1, "route", "string expected, got " .. type(method)) end
  if method ~= "*" and not find(method, "^[%w!#$%%&'*+%-.^_`|~]+$") then
    argerror(2, 1, "route", "bad method '" .. method .. "'")
  end
  -- (methods are case-sensitive, RFC 9110 §9.1, and llhttp parses upper-case ones only: a
  -- "get" route would answer nothing over HTTP/1.1, a GET 405 with "Allow: get")
  if find(method, "%l") then
    argerror(2, 1, "route", "bad method '" .. method .. "' (methods are case-sensitive: '" .. method:upper() .. "'?)")
  end
  add(self, method, pattern, fn, "route", 2)
  return self
end

for name, method in pairs { get = "GET", post = "POST", put = "PUT", patch = "PATCH",
                            delete = "DELETE", options = "OPTIONS", head = "HEAD" } do
  Router[name] = function(self, pattern, fn)
    checkself(self, name)
    add(self, method, pattern, fn, name, 1)
    return self
  end
end

--- app:use(fn): middleware fn(req, res, next), run in registration order before any route
-- (also before mounts and static directories, whenever those were registered).
function Router:use(fn)
  checkself(self, "use")
  checkfn(2, 1, "use", fn)
  self.stack[#self.stack + 1] = fn
  return self
end

local function addfallback(self, prefix, run, target)
  if prefix ~= "/" and byte(prefix, -1) == SLASH then prefix = sub(prefix, 1, -2) end
  if prefix == "/" then prefix = "" end
  self.fallbacks[#self.fallbacks + 1] = {
    prefix = prefix, len = #prefix, pat = "^" .. prefix:gsub("%p", "%%%0"),
    run = run, target = target,
  }
end

-- A mount's `next` and restorer in one table: the sub-router sees the stripped path; when it
-- falls through, the parent's chain goes on with the original path and base; when it
-- returns or raises (<close>), the original values are back.
local Resume = {}
Resume.__call = function(r)
  local req = r[1]
  req.path, req.base = r[2], r[3]
  r[6]()
  req.path, req.base = r[4], r[5]
end
Resume.__close = function(r)
  r[1].path, r[1].base = r[2], r[3]
end

local function run_mount(fb, req, res, nxt)
  local path, base = req.path, req.base
  local inner = sub(path, fb.len + 1)
  if inner == "" then inner = "/" end
  local ibase = (base or "") .. fb.prefix
  local _resume <close> = setmetatable({ req, path, base, inner, ibase, nxt }, Resume)
  req.path, req.base = inner, ibase
  fb.target(req, res, _resume)
end

local function run_static(fb, req, res, nxt)
  return fb.target(req, res, nxt)
end

--- app:mount(prefix, sub): requests for prefix and below go to `sub` (a router or any
-- callable fn(req, res, next)) with `req.path` stripped of the prefix ("/" for the prefix
-- itself, so "/api" and "/api/" both reach the sub-router as "/") and `req.base` set to the
-- prefix (nested mounts concatenate). Prefixes are literal. If `sub` matches nothing it
-- falls through to what follows in this router.
function Router:mount(prefix, router)
  checkself(self, "mount")
  checkpath(2, 1, "mount", prefix, "prefix")
  checkfn(2, 2, "mount", router)
  addfallback(self, prefix, run_mount, router)
  return self
end

--- app:static(prefix, dir [, opts]): files under `dir` (see moonwire.http.static). Missing
-- files fall through to what follows (later mounts/static, then 405/404).
function Router:static(prefix, dir, opts)
  checkself(self, "static")
  local handler = static.build(3, "static", prefix, dir, opts)
  addfallback(self, prefix, run_static, handler)
  return self
end

local M = {}

--- A new, empty router.
function M.new()
  return setmetatable({ root = newnode(), exact = {}, stack = {}, fallbacks = {} }, Router)
end

M.Router = Router

return M
