-- The build finds llhttp or stops: a module without it would fail at require with
-- "undefined symbol: llhttp_init". `make demo` and `make test` install packages first (deps),
-- so their build must read the llhttp settings after deps ran, not when make started.
local helper = require "spec.helper"

-- runs `make ARGS` in this checkout (a make of its own: no flags of an outer `make test`);
-- returns its output and whether it succeeded
local function make(args)
  local p = assert(io.popen("env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make --no-print-directory "
    .. args .. " 2>&1"))
  local out = p:read("a")
  return out, p:close()
end

local function sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  p:close()
  return out
end

local function tmpdir()
  return (sh("mktemp -d"):gsub("%s+$", ""))
end

-- llhttp_* symbols a shared object uses without defining
local function undefined_llhttp(so)
  local list = {}
  for sym in sh("nm -D --undefined-only " .. so):gmatch("U (llhttp_[%w_]+)") do list[#list + 1] = sym end
  return list
end

local function file_exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

describe("the build", function()
  it("stops and says what to install when it finds no llhttp", function()
    local dir = tmpdir()
    assert(os.execute("mkdir -p " .. dir .. "/llhttp"))
    -- pkg-config cannot answer (PKG=false), LLHTTP_DIR holds no sources
    local out, ok = make(("BUILD=%s/build LLHTTP_DIR=%s/llhttp PKG=false all"):format(dir, dir))
    local made = file_exists(dir .. "/build/moonwire/core.so")
    sh("rm -rf " .. dir)
    assert.is_falsy(ok)
    assert.is_false(made)
    assert.matches("llhttp not found", out, 1, true)
    assert.matches("apt-get install node-llhttp", out, 1, true)
  end)

  it("built the module under test with every llhttp_* symbol it uses", function()
    local so = assert(package.searchpath("moonwire.core", package.cpath))
    local undefined = undefined_llhttp(so)
    if #undefined > 0 then
      -- only a module linked against a system libllhttp may leave them to the loader
      assert.matches("NEEDED.-libllhttp", sh("readelf -d " .. so))
    end
    assert.is_true(helper.mw.version ~= nil)
  end)

  it("reads llhttp's settings after deps ran (make demo, make test on a fresh machine)", function()
    local src = "/usr/share/llhttp"
    if not (file_exists(src .. "/llhttp.c") and file_exists("/usr/share/include/llhttp/llhttp.h")) then
      pending("needs Debian's node-llhttp sources")
      return
    end
    local dir = tmpdir()
    -- a deps step that "installs" llhttp where this make looks for it (absent when it starts)
    local install = ("mkdir -p %s/share/llhttp %s/share/include/llhttp && cp %s/*.c %s/share/llhttp/ && "
      .. "cp /usr/share/include/llhttp/llhttp.h %s/share/include/llhttp/"):format(dir, dir, src, dir, dir)
    local out, ok = make(("-j2 BUILD=%s/build LLHTTP_DIR=%s/share/llhttp PKG=false CFLAGS=-O0 "
      .. "INSTALL_DEPS='%s' deps-build"):format(dir, dir, install))
    local so = dir .. "/build/moonwire/core.so"
    local made = file_exists(so)
    local undefined = made and undefined_llhttp(so) or {}
    sh("rm -rf " .. dir)
    assert(ok, out)
    assert.is_true(made)
    assert.same({}, undefined)
  end)
end)
