-- The rockspec installs every Lua module of the tree: a module added under lua/ but
-- forgotten in moonwire-scm-1.rockspec would be missing from `luarocks make` installs.
describe("moonwire-scm-1.rockspec", function()
  it("lists every module under lua/", function()
    local env = {}
    local chunk = assert(loadfile("moonwire-scm-1.rockspec", "t", env))
    chunk()
    local listed = {}
    for mod, file in pairs(env.build.install.lua) do listed[file] = mod end
    local p = assert(io.popen("find lua -name '*.lua' | sort"))
    local missing = {}
    for file in p:lines() do
      if not listed[file] then missing[#missing + 1] = file end
    end
    p:close()
    assert.same({}, missing)
  end)
end)
