-- The TLS half of the differential test: LuaSec's API (ssl.wrap, :sni, :dohandshake,
-- :getpeercertificate) over LuaSocket, run with Debian's LuaSocket + LuaSec in a plain lua5.4
-- and under mw.run with moonwire.socket and moonwire.socket.ssl installed. Peer:
-- spec/luasocket/server.py's TLS port. Args: port, ca.pem, the server's leaf certificate.
local socket = require "socket"
local ssl = require "ssl"
local port, ca, leaf = tonumber(arg[1]), arg[2], arg[3]

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

local function readfile(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local params = { mode = "client", protocol = "any", verify = "peer", cafile = ca,
                 options = { "all", "no_sslv3" } }

local function open(p)
  local c = assert(socket.connect("127.0.0.1", port))
  local s = assert(ssl.wrap(c, p))
  s:sni("localhost")
  return s, c
end

do
  local s, plain = open(params)
  show("handshake", s:dohandshake())
  show("plain after wrap", plain:send("x"))
  show("tostring", (tostring(s):gsub("0x%x+", "ADDR"):gsub(": [%x]+$", ": ADDR")))
  local cert = s:getpeercertificate()
  show("pem is the leaf", cert:pem() == readfile(leaf))
  show("signature", cert:getsignaturename())
  show("verified", s:getpeerverification())
  show("protocol", s:info().protocol:match("^TLSv1%.[23]$") ~= nil)
  show("settimeout", s:settimeout(5))
  show("send", s:send("lines\n"))
  for i = 1, 5 do show("line " .. i, s:receive("*l")) end
  show("count", s:receive(3))
  s:close()
end

do
  local s = open(params)
  s:dohandshake()
  s:send("counts\n")
  show("tls count 5", s:receive(5))
  show("tls prefix", s:receive(3, "xy"))
  show("tls line", s:receive("*l"))
  s:close()
end

do   -- no trust anchor for the test CA: the handshake fails, nothing is sent
  local s = open({ mode = "client", protocol = "any", verify = "peer",
                   cafile = leaf:gsub("server%.pem$", "unknown-ca.pem") })
  local ok, err = s:dohandshake()
  show("untrusted", ok, type(err), err:find("certificate verify failed", 1, true) ~= nil)
  s:close()
end

do   -- verify = "none" accepts it
  local s = open({ mode = "client", protocol = "any", verify = "none" })
  show("verify none", s:dohandshake())
  s:send("all\n")
  show("all", s:receive("*a"))
  s:close()
end
do   -- TLS 1.3's suites: the client's single suite is the one used
  local s = open({ mode = "client", protocol = "tlsv1_3", verify = "none",
                   ciphersuites = "TLS_CHACHA20_POLY1305_SHA256" })
  show("ciphersuites", s:dohandshake())
  show("cipher", s:info("cipher"))
  s:close()
end
do   -- a verify flag or a protocol LuaSec does not know: nil, err (a misspelt "peer" left
     -- the shim's connection unverified)
  for _, p in ipairs { { verify = "peeer" }, { verify = { "peer", "bogus" } }, { protocol = "sslv3" },
                       { protocol = "tlsv9" } } do
    p.mode, p.protocol, p.verify = "client", p.protocol or "any", p.verify or "none"
    show("newcontext " .. tostring(p.protocol) .. " " .. tostring(type(p.verify) == "table" and
      table.concat(p.verify, ",") or p.verify), ssl.newcontext(p))
    local c = assert(socket.connect("127.0.0.1", port))
    show("wrap", ssl.wrap(c, p))
    c:close()
  end
end
print("done")
