-- The rockspecs install every Lua module of the tree (a module added under lua/ but forgotten
-- in a rockspec would be missing from its installs), and the release's version is the one the
-- code reports: moonwire.core, mw.version, `moonwire version`, the Makefile and CHANGELOG.md.
local mw = require "moonwire"

local function load_rockspec(file)
  local env = {}
  local chunk = assert(loadfile(file, "t", env))
  chunk()
  return env
end

local function read(file)
  local f = assert(io.open(file))
  local s = f:read("a")
  f:close()
  return s
end

local function lines(cmd)
  local p = assert(io.popen(cmd))
  local list = {}
  for line in p:lines() do list[#list + 1] = line end
  p:close()
  return list
end

-- rockspecs/ is left out of the release archive (it sums the archive): none there
local release_file = lines("ls rockspecs/moonwire-*-1.rockspec 2>/dev/null")[1]
local rockspecs = { "moonwire-scm-1.rockspec", release_file }

for _, file in ipairs(rockspecs) do
  describe(file, function()
    local spec = load_rockspec(file)

    it("lists every module under lua/, each under its own name", function()
      local listed = {}
      for mod, path in pairs(spec.build.install.lua) do listed[path] = mod end
      local missing, misnamed = {}, {}
      for _, path in ipairs(lines("find lua -name '*.lua' | sort")) do
        local mod = listed[path]
        if not mod then
          missing[#missing + 1] = path
        else
          local want = path:gsub("^lua/", ""):gsub("/init%.lua$", ""):gsub("%.lua$", ""):gsub("/", ".")
          if mod ~= want then misnamed[#misnamed + 1] = mod .. " = " .. path end
          listed[path] = nil
        end
      end
      assert.same({}, missing)
      assert.same({}, misnamed)
      assert.same({}, listed) -- listed but not in the tree
    end)

    it("is for Linux, with OpenSSL and zlib as external dependencies", function()
      assert.same({ "linux" }, spec.supported_platforms)
      assert.equal("openssl/ssl.h", spec.external_dependencies.OPENSSL.header)
      assert.equal("zlib.h", spec.external_dependencies.ZLIB.header)
      assert.equal("build/moonwire/core.so", spec.build.install.lib["moonwire.core"])
      assert.equal("bin/moonwire", spec.build.install.bin.moonwire)
    end)
  end)
end

describe("the release", function()
  local version = mw.version

  it("has one version: core, mw.version, moonwire version, Makefile, CHANGELOG.md", function()
    assert.matches("^%d+%.%d+%.%d+$", version)
    assert.equal(require("moonwire.core").version, version)
    -- under make test-asan a child lua5.4 needs the ASan runtime preloaded (spec/helper.lua)
    local preload = os.getenv("MW_ASAN_PRELOAD")
    local out = lines((preload and ("env LD_PRELOAD=" .. preload .. " ") or "") .. "lua5.4 bin/moonwire version")[1]
    assert.equal(("moonwire %s (%s)"):format(version, _VERSION), out)
    assert.equal(version, read("Makefile"):match("\nVERSION%s*:=%s*(%S+)"))
    assert.equal(version, read("CHANGELOG.md"):match("\n## (%d+%.%d+%.%d+)"))
  end)

  it("has its rockspec: that version, a release archive as source", function()
    if not release_file then
      pending("no rockspecs/ here (a release archive)")
      return
    end
    assert.equal(("rockspecs/moonwire-%s-1.rockspec"):format(version), release_file)
    local spec = load_rockspec(release_file)
    assert.equal(version .. "-1", spec.version)
    assert.equal("moonwire-" .. version, spec.source.dir)
    assert.matches("^https://.*/moonwire%-" .. version:gsub("%.", "%%.") .. "%.tar%.gz$", spec.source.url)
    assert.matches("^%x+$", spec.source.md5)
  end)
end)
