-- One LuaSocket client script, run twice by spec/luasocket_spec.lua: in a plain lua5.4 with
-- Debian's LuaSocket, and under mw.run with moonwire.socket installed as `socket`. It prints a
-- transcript of every call's results (all of them, counted with select('#')); the spec
-- compares the two transcripts byte for byte. Peer: spec/luasocket/server.py.
local socket = require "socket"
local port, dead = tonumber(arg[1]), tonumber(arg[2])

local function fmt(v)
  if type(v) == "string" then return ("%q"):format(v):gsub("\\\n", "\\n") end
  if type(v) == "number" then return math.type(v) .. ":" .. tostring(v) end
  return tostring(v)
end

local function show(label, ...)
  local out = {}
  for i = 1, select("#", ...) do out[i] = fmt((select(i, ...))) end
  print(label .. " -> " .. table.concat(out, ", "))
end

-- errors raised by misuse: the message without its position
local function raises(label, f, ...)
  local ok, err = pcall(f, ...)
  print(label .. " raises -> " .. tostring(ok) .. " " .. tostring(err):gsub("^[^:]*:%d+: ", ""))
end

local function open(name)
  local c = assert(socket.connect("127.0.0.1", port))
  assert(c:send(name .. "\n"))
  return c
end

-- *l: CRLF, LF, a lone CR inside, an empty line, a last line without terminator
do
  local c = open("lines")
  for i = 1, 7 do show("lines *l " .. i, c:receive("*l")) end
  c:close()
  c = open("lines_crlf_end")
  show("crlf *l", c:receive("*l"))
  show("crlf default", c:receive())
  show("crlf after end", c:receive())
  show("crlf *a after end", c:receive("*a"))
  show("crlf count after end", c:receive(3))
  c:close()
end

-- *a, and *a on a stream that ends with nothing
do
  local c = open("all")
  show("all *a", c:receive("*a"))
  show("all *a again", c:receive("*a"))
  c:close()
  c = open("empty")
  show("empty *a", c:receive("*a"))
  c:close()
  c = open("all")
  show("all prefix", c:receive("*a", "pre:"))
  c:close()
end

-- counts, 0, prefixes (which count towards n), floats, a count past the end
do
  local c = open("counts")
  show("count 3", c:receive(3))
  show("count 0", c:receive(0))
  show("count 4 prefix xy", c:receive(4, "xy"))
  show("count 2 prefix xyz", c:receive(2, "xyz"))
  show("count 0 prefix q", c:receive(0, "q"))
  show("count 2.7", c:receive(2.7))
  show("count '3'", c:receive("3"))
  show("line prefix", c:receive("*l", ">"))
  show("count past end", c:receive(10))
  c:close()
  c = open("counts")
  show("count 5 then line", c:receive(5))
  show("line to end", c:receive("*l"))
  c:close()
end

-- misuse
do
  local c = open("counts")
  raises("bad pattern", function() return c:receive("*x") end)
  raises("negative count", function() return c:receive(-1) end)
  c:close()
end

-- timeouts: nil, "timeout", partial; the socket stays usable and prefix resumes
do
  local c = open("timeout_line")
  show("settimeout", c:settimeout(0.3))
  show("tl ready", c:receive("*l"))
  local r, err, partial = c:receive("*l")
  show("tl timeout", r, err, partial)
  show("tl go", c:send("go\n"))
  show("tl settimeout nil", c:settimeout(nil))
  show("tl resume", c:receive("*l", partial))
  show("tl rest", c:receive("*a"))
  c:close()

  c = open("timeout_count")
  c:settimeout(0.3)
  show("tc ready", c:receive("*l"))
  r, err, partial = c:receive(10)
  show("tc timeout", r, err, partial)
  c:send("go\n")
  c:settimeout(-1)
  show("tc resume", c:receive(10, partial))
  c:close()

  c = open("timeout_all")
  c:settimeout(0.3, "t")
  show("ta ready", c:receive("*l"))
  r, err, partial = c:receive("*a")
  show("ta timeout", r, err, partial)
  c:send("go\n")
  c:settimeout(1, "b")
  c:settimeout(nil, "t")
  show("ta resume", c:receive("*a", partial))
  c:close()

  c = open("silent")
  show("settimeout 0", c:settimeout(0))
  show("nonblocking receive", c:receive("*l"))
  show("nonblocking count", c:receive(4))
  show("nonblocking 0", c:receive(0))
  show("nonblocking send", c:send("abc"))
  c:close()
end

-- send(data, i, j) and shutdown("send")
do
  local c = open("echo")
  show("send all", c:send("hello "))
  show("send i", c:send("abcdef", 3))
  show("send i j", c:send("abcdef", 2, 4))
  show("send negative", c:send("abcdef", -2))
  show("send negative j", c:send("abcdef", 1, -5))
  show("send empty range", c:send("abcdef", 5, 2))
  show("send empty", c:send(""))
  show("send past end", c:send("xyz", 2, 10))
  show("send zero i", c:send("xyz", 0))
  show("send number", c:send(42))
  show("shutdown send", c:shutdown("send"))
  show("echo", c:receive("*a"))
  c:close()
end

-- the family argument of socket.connect: "unspec", "inet", "inet6"; another raises
do
  for _, f in ipairs { "unspec", "inet" } do
    local c, err = socket.connect("127.0.0.1", port, nil, nil, f)
    show("connect family " .. f, c and tostring(c):match("^tcp{%a+}") or nil, err)
    if c then c:close() end
  end
  local ok, err = pcall(socket.connect, "127.0.0.1", port, nil, nil, "bogus")
  show("connect family bogus", ok, tostring(err):match("#5 to '.-' %((.*)%)$"))
end

-- errors: refused, reset by the peer, use after close, closed mid-read
do
  show("refused", socket.connect("127.0.0.1", dead))
  local t = socket.tcp()
  show("tcp connect refused", t:connect("127.0.0.1", dead))
  t:close()

  local c = open("reset")
  c:send("go\n")
  show("reset receive", c:receive("*l"))
  show("reset send", c:send("x"))
  c:close()

  c = open("all")
  show("close", c:close())
  show("receive after close", c:receive())
  show("send after close", c:send("x"))
  show("close again", c:close())

  c = open("timeout_line")
  show("mid read", c:receive("*l"))
  c:send("go\n")
  show("mid read count", c:receive(100))
  show("mid read after", c:receive(1))
  c:close()
end

-- a big line crosses many reads
do
  local c = open("big")
  local line = c:receive("*l")
  show("big line", #line, line:sub(1, 3))
  show("big rest", c:receive("*l"))
  c:close()
end

-- addresses, options, stats, names
do
  local c = open("echo")
  local ip, p, fam = c:getpeername()
  show("getpeername", ip, p == port, math.type(p), fam)
  ip, p, fam = c:getsockname()
  show("getsockname", ip, type(p), tonumber(p) > 0, fam)
  show("nodelay", c:setoption("tcp-nodelay", true))
  show("keepalive", c:setoption("keepalive", true))
  show("reuseaddr", c:setoption("reuseaddr", true))
  raises("bad option", function() return c:setoption("no-such-option", true) end)
  c:send("12345")
  c:shutdown("send")
  c:receive("*a")
  local r, s, age = c:getstats()
  show("getstats", r, s, type(age))
  show("tostring", (tostring(c):gsub("0x%x+", "ADDR"):gsub(": [%x]+$", ": ADDR")))
  c:close()
  show("tostring closed", (tostring(c):gsub("0x%x+", "ADDR"):gsub(": [%x]+$", ": ADDR")))
  local t = socket.tcp()
  show("tostring master", (tostring(t):gsub("0x%x+", "ADDR"):gsub(": [%x]+$", ": ADDR")))
  show("master settimeout", t:settimeout(2))
  show("master connect", t:connect("127.0.0.1", port))
  show("master send", t:send("echo\nab"))
  t:shutdown("send")
  show("master receive", t:receive("*a"))
  t:close()
end

-- server side: bind, listen, accept
do
  local srv = assert(socket.bind("127.0.0.1", 0))
  local ip, p, fam = srv:getsockname()
  show("bind", ip, type(p), fam)
  show("tostring server", (tostring(srv):gsub("0x%x+", "ADDR"):gsub(": [%x]+$", ": ADDR")))
  local c = assert(socket.connect(ip, p))
  local a = assert(srv:accept())
  show("accepted peer", a:getpeername() == c:getsockname())
  c:send("ping\n")
  show("accepted receive", a:receive())
  a:send("pong\r\n")
  show("client receive", c:receive())
  a:close()
  show("client after close", c:receive())
  c:close()
  srv:settimeout(0.05)
  show("accept timeout", srv:accept())
  srv:close()
end

-- module-level helpers
do
  show("gettime", type(socket.gettime()))
  show("sleep", socket.sleep(0.01))
  local addr, info = socket.dns.toip("127.0.0.1")
  show("toip", addr, #info.alias, info.ip[1], #info.ip)
  show("toip localhost", (socket.dns.toip("localhost")))
  show("_VERSION", type(socket._VERSION))
  local try = socket.newtry(function() print("finalizer ran") end)
  show("protect", socket.protect(function() try(nil, "boom") end)())
  show("skip", socket.skip(1, "a", "b", "c"))
  show("try ok", socket.try(1, 2))
end
print("done")
