--- moonwire.socket.ssl: the part of LuaSec's API that LuaSocket drivers use (ssl.wrap,
-- :dohandshake, :getpeercertificate with :pem and :getsignaturename, :sni, :info), on
-- moonwire's TLS (sock:starttls). moonwire.socket.install() makes `require "ssl"` return it.
-- Contexts are moonwire's: TLS 1.2+ only, and verify = "peer" also checks the host name.
local socket = require "moonwire.socket"
local tls = require "moonwire.tls"

local M = { _VERSION = "1.2.0 (moonwire)" }

local tcp = socket.tcp_mt.__index
local retry, now = socket._retry, socket._now

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

-- LuaSec's verify flags and protocol names (others: nil, "invalid ... (name)", as LuaSec)
local VERIFY = { none = true, peer = true, client_once = true, fail_if_no_peer_cert = true }
local PROTOCOL = { any = true, sslv23 = true, tlsv1 = true, tlsv1_1 = true, tlsv1_2 = true, tlsv1_3 = true }

-- true when the verify option asks for "peer"; nil, err for a flag LuaSec does not know (a
-- misspelt "peer" must not leave the connection unverified)
local function wants_peer(v)
  if v == nil then return false end
  local list = type(v) == "table" and v or { v }
  local peer = false
  for _, x in ipairs(list) do
    if not VERIFY[x] then return nil, "invalid verify option (" .. tostring(x) .. ")" end
    if x == "peer" then peer = true end
  end
  return peer
end

local ctx_mt = { __name = "SSL context" }

--- ssl.newcontext(params) -> context | nil, err. params: mode ("client"/"server"), protocol
-- ("any", "tlsv1_2", "tlsv1_3"), verify ("none"/"peer" or a list), certificate, key,
-- cafile, capath, alpn, ciphers, ciphersuites; options are accepted and ignored (moonwire sets
-- its own).
function M.newcontext(params)
  if type(params) ~= "table" then argerror(1, "newcontext", "table expected, got " .. type(params)) end
  local server = params.mode == "server"
  if not server and params.mode ~= nil and params.mode ~= "client" then
    return nil, "invalid mode"
  end
  if params.protocol ~= nil and not PROTOCOL[params.protocol] then
    return nil, "invalid protocol (" .. tostring(params.protocol) .. ")"
  end
  local verify, verr = wants_peer(params.verify)
  if verify == nil then return nil, verr end
  local o = {
    cert = params.certificate, key = params.key, cafile = params.cafile, capath = params.capath,
    ciphers = params.ciphers, ciphersuites = params.ciphersuites,
    alpn = type(params.alpn) == "string" and { params.alpn } or params.alpn,
    min_version = params.protocol == "tlsv1_3" and "1.3" or nil,
  }
  if server then
    if verify then o.verify_client = true end
  else
    o.insecure = not verify
  end
  local ok, ctx = pcall(server and tls.server_context or tls.client_context, o)
  if not ok then return nil, tostring(ctx):gsub("^[^:]*:%d+: ", "") end
  return setmetatable({ ctx = ctx, server = server, verify = verify, params = params }, ctx_mt)
end

--- ssl.wrap(sock, params | context) -> sslsock | nil, err. The plain object is spent (its
-- calls fail with "closed"), as with LuaSec; the new one has every tcp method and TLS ones.
function M.wrap(sock, params)
  if not socket.is_socket(sock) or sock.kind ~= "client" then
    argerror(1, "wrap", "connected tcp{client} expected")
  end
  local ctx = params
  if getmetatable(params) ~= ctx_mt then
    local err
    ctx, err = M.newcontext(params)
    if not ctx then return nil, err end
  end
  if not sock.s then return nil, "closed" end
  local s = setmetatable({}, getmetatable(sock))
  for k, v in pairs(sock) do s[k] = v end
  s.sslp = ctx
  sock.s, sock.rb, sock.rp = nil, "", 1
  return s
end

local function checkssl(self, fname)
  if not socket.is_socket(self) or not self.sslp then
    argerror(1, fname, "SSL connection expected")
  end
  return self
end

--- sslsock:sni(name): the name sent as SNI and, with verify = "peer", checked.
function tcp:sni(name)
  checkssl(self, "sni")
  if type(name) ~= "string" then argerror(1, "sni", "string expected") end
  self.sni_name = name
  return true
end

--- sslsock:dohandshake() -> true | false, err (LuaSec's shape; a timeout is "wantread", as
-- LuaSec's, and calling again resumes the handshake)
function tcp:dohandshake()
  checkssl(self, "dohandshake")
  if self.tls then return true end
  if not self.s then return false, "closed" end
  local c = self.sslp
  local host = self.sni_name or c.params.server_name
  if not c.server and c.verify then host = host or self.host end
  -- a timeout leaves the handshake pending: the next call resumes it (same context)
  local ok, err, code = self.s:starttls(c.ctx, { host = host, timeout = retry(self, now()) or -1 })
  if not ok then return false, code == "timeout" and "wantread" or err end
  self.tls = true
  return true
end

local cert_mt = {}
cert_mt.__index = cert_mt

local function base64(s)
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = (a << 16) | ((b or 0) << 8) | (c or 0)
    local k = #out
    out[k + 1] = alphabet:sub((n >> 18) + 1, (n >> 18) + 1)
    out[k + 2] = alphabet:sub(((n >> 12) & 63) + 1, ((n >> 12) & 63) + 1)
    out[k + 3] = b and alphabet:sub(((n >> 6) & 63) + 1, ((n >> 6) & 63) + 1) or "="
    out[k + 4] = c and alphabet:sub((n & 63) + 1, (n & 63) + 1) or "="
  end
  return table.concat(out)
end

--- cert:pem() -> the certificate in PEM (64-column base64, as OpenSSL writes it)
function cert_mt:pem()
  local b = base64(self._der)
  local lines = { "-----BEGIN CERTIFICATE-----" }
  for i = 1, #b, 64 do lines[#lines + 1] = b:sub(i, i + 63) end
  lines[#lines + 1] = "-----END CERTIFICATE-----\n"
  return table.concat(lines, "\n")
end

--- cert:der() -> DER bytes (an extension); cert:getsignaturename() -> "RSA-SHA256", ...
function cert_mt:der() return self._der end
function cert_mt:getsignaturename() return self.signature end
cert_mt.__tostring = function(self) return ("X509 certificate: %p"):format(self) end

--- sslsock:getpeercertificate([n]) -> cert | nil: the leaf only (n = 1 or nil)
function tcp:getpeercertificate(n)
  if not socket.is_socket(self) then argerror(1, "getpeercertificate", "SSL connection expected") end
  if (n and n ~= 1) or not self.s then return nil end
  local der, sig = self.s:tls_peer_certificate()
  if not der then return nil end
  return setmetatable({ _der = der, signature = sig }, cert_mt)   -- (not `der`: the method)
end

--- sslsock:getpeerverification() -> verified, errors (LuaSec's shape, without the details)
function tcp:getpeerverification()
  checkssl(self, "getpeerverification")
  local info = self.s and self.s:tls_info()
  if info and info.peer_verified then return true end
  return false, { { "certificate not verified" } }
end

--- sslsock:info([field]) -> { protocol, cipher, alpn, sni } or one of them
function tcp:info(field)
  checkssl(self, "info")
  local i = self.s and self.s:tls_info()
  if not i then return nil end
  local t = { protocol = i.version, cipher = i.cipher, alpn = i.alpn, sni = i.sni }
  if field then return t[field] end
  return t
end

function tcp:getalpn()
  checkssl(self, "getalpn")
  local i = self.s and self.s:tls_info()
  return i and i.alpn
end

return M
