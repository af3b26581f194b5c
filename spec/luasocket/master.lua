-- Small differential cases (spec/luasocket_spec.lua runs this with Debian's LuaSocket and
-- under the shim and compares the transcripts): bind without listen, local addresses,
-- argument checks. Needs no peer: it makes its own servers. Arg: the case to run.
local socket = require "socket"

local function fmt(v)
  if type(v) == "string" then
    v = v:gsub("^[^:]*:%d+: ", "")        -- the shim's errors carry the caller's position
    if v:match("^tcp{") then v = v:gsub("0x%x+", "ADDR") end
    return ("%q"):format(v)
  end
  if type(v) == "number" then return math.type(v) .. ":" .. tostring(v) end
  return tostring(v)
end

local function show(label, ...)
  local out = {}
  for i = 1, select("#", ...) do out[i] = fmt((select(i, ...))) end
  print(label .. " -> " .. table.concat(out, ", "))
end

-- a port nobody uses now (a listener closed before any connection leaves no TIME_WAIT)
local function free_port()
  local tmp = assert(socket.bind("127.0.0.1", 0))
  local port = tonumber((select(2, tmp:getsockname())))
  tmp:close()
  return port
end

local cases = {}

function cases.bind()
  -- a master bound, never listen()ed, then closed: its address is free again
  local port = free_port()
  local m = socket.tcp()
  show("bind", m:bind("127.0.0.1", port))
  local host, p, fam = m:getsockname()
  show("getsockname", host, tonumber(p) == port, fam)
  show("bind again", m:bind("127.0.0.1", 0))
  show("close", m:close())
  local m2 = socket.tcp()
  show("rebind after close", m2:bind("127.0.0.1", port))
  m2:close()
  -- bind, then connect: the connection leaves from the bound port
  local srv = assert(socket.bind("127.0.0.1", 0))
  local lport = free_port()
  local c = socket.tcp()
  show("bind", c:bind("127.0.0.1", lport))
  show("connect", c:connect("127.0.0.1", (select(2, srv:getsockname()))))
  srv:settimeout(2)
  local a = assert(srv:accept())
  show("peer sees the bound port", tonumber((select(2, a:getpeername()))) == lport)
  show("own port", tonumber((select(2, c:getsockname()))) == lport)
  c:close(); a:close(); srv:close()
end

function cases.lhost()
  -- socket.connect's local address may be "*" or a name (resolved) as well as an address
  local srv = assert(socket.bind("127.0.0.1", 0))
  srv:settimeout(2)
  local port = tonumber((select(2, srv:getsockname())))
  for _, lhost in ipairs { "*", "localhost", "127.0.0.1" } do
    local lport = free_port()
    local c, err = socket.connect("127.0.0.1", port, lhost, lport)
    show("connect from " .. lhost, c and tostring(c), err)
    local a = assert(srv:accept())
    show("peer sees the local port", tonumber((select(2, a:getpeername()))) == lport)
    c:close(); a:close()
  end
  local c, err = socket.connect("127.0.0.1", port, "localhost")
  show("no local port", c and tostring(c), err)
  if c then c:close(); assert(srv:accept()):close() end
  show("unknown name", socket.connect("127.0.0.1", port, "no-such-host.invalid", 0))
  show("other family", socket.connect("127.0.0.1", port, "::1", 0))
  srv:close()
end

function cases.send()
  -- send's indices are numbers (or numeric strings); anything else raises
  local srv = assert(socket.bind("127.0.0.1", 0))
  local c = assert(socket.connect("127.0.0.1", (select(2, srv:getsockname()))))
  local function try(...)
    local args = table.pack(...)
    show("send", pcall(function()
      local n, err, last = c:send(table.unpack(args, 1, args.n))   -- not a tail call: the name
      return n, err, last
    end))
  end
  try("hello", "x")
  try("hello", 2, {})
  try("hello", true)
  try("hello", "2", "3")
  try("hello", 2.9, -1.5)
  try("hello", nil, 2)
  c:close(); srv:close()
end

function cases.family()
  show("tcp()", socket.tcp():getfamily())
  show("tcp4()", socket.tcp4():getfamily())
  show("tcp6()", socket.tcp6():getfamily())
  local srv = assert(socket.bind("127.0.0.1", 0))
  local c = assert(socket.connect("127.0.0.1", (select(2, srv:getsockname()))))
  show("server", srv:getfamily())
  show("client", c:getfamily())
  c:close(); srv:close()
  local s6 = socket.bind("::1", 0)
  if s6 then   -- (no IPv6 loopback: LuaSocket's answers cannot be had either)
    local c6 = assert(socket.connect("::1", (select(2, s6:getsockname()))))
    show("client6", c6:getfamily())
    c6:close(); s6:close()
  end
end

print("case " .. arg[1])
cases[arg[1]]()
print("done")
