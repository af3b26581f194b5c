-- moonwire.socket (docs/luasocket.md): LuaSocket's TCP API on moonwire's sockets.
-- Differential: spec/luasocket/client.lua runs twice against the scripted peer
-- spec/luasocket/server.py, once with Debian's LuaSocket in a plain lua5.4 and once under
-- mw.run with the shim installed as `socket`; the transcripts (every return value of every
-- call: lines with CRLF/LF/CR/no terminator, *a, counts, 0, prefixes, timeouts in both modes
-- with resumption, non-blocking mode, send ranges, refused, reset, closed mid-read, use after
-- close, names, options, stats, bind/accept, helpers) must be equal except for the documented
-- differences. The same for a real driver (nrk's redis-lua against redis-server). Then what
-- only the shim does: tasks that wait cooperatively, the keepalive pool, install/with,
-- LuaSocket's own socket.http and socket.smtp running unchanged, and TLS (sslhandshake, a
-- LuaSec-style ssl.wrap with getpeercertificate).
local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local lsocket = require "moonwire.socket"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local DIR = SPEC_DIR .. "/luasocket"

-- A transcript from a LuaSocket script: real (plain lua5.4) or under the shim.
local function transcript(script, shim, ...)
  local args = {}
  for i, a in ipairs({ ... }) do args[i] = ("%q"):format(tostring(a)) end
  local src
  if shim then
    src = ("arg = { [0] = %q, %q, %s }\ndofile(%q)\n"):format(DIR .. "/run_shim.lua",
      script, table.concat(args, ", "), DIR .. "/run_shim.lua")
  else
    src = ("arg = { [0] = %q, %s }\ndofile(%q)\n"):format(script, table.concat(args, ", "), script)
  end
  local out, how, code = helper.subprocess(src, 30)
  return out, how, code
end

local function lines(s)
  local t = {}
  for l in s:gmatch("[^\n]*") do t[#t + 1] = l end
  return t
end

-- Compares line by line; `known` maps a line of the real transcript to the shim's (documented
-- differences, docs/luasocket.md).
local function compare(real, shim, known)
  local a, b = lines(real), lines(shim)
  local used = {}
  for i = 1, math.max(#a, #b) do
    local want = a[i] and known[a[i]] or a[i]
    if want ~= a[i] then used[a[i]] = true end
    assert(want == b[i], ("line %d differs:\n real: %s\n want: %s\n shim: %s")
      :format(i, tostring(a[i]), tostring(want), tostring(b[i])))
  end
  for k in pairs(known) do assert(used[k], "known difference not seen: " .. k) end
end

local function has_real_luasocket()
  return os.execute("lua5.4 -e 'require \"socket.core\"' >/dev/null 2>&1")
end

describe("moonwire.socket against Debian's LuaSocket", function()
  local server, port, dead

  setup(function()
    assert(has_real_luasocket(), "Debian's lua-socket is missing (scripts/install-deps test)")
    server = assert(io.popen("exec python3 " .. DIR .. "/server.py"))
    port, dead = server:read("n", "n")
    assert(port and dead, "spec/luasocket/server.py did not start")
  end)

  teardown(function()
    if port then
      run(function()
        local c = mw.tcp.connect("127.0.0.1", port)
        if c then c:write("quit\n") c:close() end
      end)
    end
    if server then server:close() end
  end)

  it("the client script gives the same transcript, every pattern, timeout and error", function()
    local real, how, code = transcript(DIR .. "/client.lua", false, port, dead)
    assert.same({ "exit", 0 }, { how, code }, real)
    local shim
    shim, how, code = transcript(DIR .. "/client.lua", true, port, dead)
    assert.same({ "exit", 0 }, { how, code }, shim)
    assert.matches("\ndone\n$", real)
    compare(real, shim, {
      -- receive(0) returns "" at once; LuaSocket first waits for a byte (here: times out)
      ['nonblocking 0 -> nil, "timeout", ""'] = 'nonblocking 0 -> "", nil, nil',
    })
  end)
end)
