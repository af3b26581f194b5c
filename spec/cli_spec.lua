-- The `moonwire` command line (bin/moonwire, lua/moonwire/cli.lua), run as a subprocess with
-- the build tree under test on its module paths: help, version, unknown commands.

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs `lua5.4 bin/moonwire ARGS...`; returns exit code, stdout, stderr.
local function moonwire(...)
  local words = {}
  for i, a in ipairs { ... } do words[i] = quote(a) end
  local base = os.tmpname()
  local out, err = base .. ".out", base .. ".err"
  local vars = { "LUA_PATH=" .. quote(package.path), "LUA_CPATH=" .. quote(package.cpath) }
  local preload = os.getenv("MW_ASAN_PRELOAD")   -- under `make test-asan`
  if preload then vars[#vars + 1] = "LD_PRELOAD=" .. quote(preload) end
  local cmd = ("env %s timeout -k 1 20 lua5.4 bin/moonwire %s >%s 2>%s </dev/null"):format(
    table.concat(vars, " "), table.concat(words, " "), out, err)
  local _, _, code = os.execute(cmd)
  local function slurp(name)
    local f = assert(io.open(name, "rb"))
    local s = f:read("a")
    f:close()
    os.remove(name)
    return s
  end
  local o, e = slurp(out), slurp(err)
  os.remove(base)
  return code, o, e
end

describe("moonwire CLI", function()
  for _, flag in ipairs { "--help", "-h", "help" } do
    it("`moonwire " .. flag .. "` prints the usage on stdout and exits 0", function()
      local code, out, err = moonwire(flag)
      assert.equal(0, code, "stderr: " .. err)
      assert.matches("^usage: moonwire <command>", out)
      assert.matches("bench %[OPTIONS%] URL", out)
      assert.equal("", err)
    end)
  end

  it("without a command: the usage on stderr, exit 2", function()
    local code, out, err = moonwire()
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("usage: moonwire <command>", err)
  end)

  it("an unknown command (or option) is named on stderr with the usage, exit 2", function()
    for _, word in ipairs { "frobnicate", "--frobnicate" } do
      local code, out, err = moonwire(word)
      assert.equal(2, code)
      assert.equal("", out)
      assert.matches("unknown command '" .. word .. "'", err, 1, true)
      assert.matches("usage: moonwire <command>", err)
    end
  end)

  it("`moonwire version` prints the version", function()
    local code, out = moonwire("version")
    assert.equal(0, code)
    assert.matches("^moonwire %S+ %(Lua 5%.4%)\n$", out)
  end)
end)
