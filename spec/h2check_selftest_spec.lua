-- spec/peers/h2check.py (the HTTP/2 conformance and abuse driver, Debian's python3-hyperframe
-- and python3-hpack under /usr/bin/python3) loads and lists its cases. The real runs against
-- moonwire's HTTP/2 server live in the server's own spec.
local PYTHON = "/usr/bin/python3"
local SCRIPT = "spec/peers/h2check.py"

-- Runs a command; returns its exit status and its stdout lines.
local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"exit=$?\""))
  local lines = {}
  for line in p:lines() do lines[#lines + 1] = line end
  p:close()
  local status = tonumber(table.remove(lines):match("^exit=(%d+)$"))
  return status, lines
end

describe("h2check.py", function()
  it("lists at least 80 cases with unique ids and exits 0", function()
    local status, lines = run(PYTHON .. " " .. SCRIPT .. " --list")
    assert.equal(0, status, table.concat(lines, "\n"))
    local total = tonumber(lines[#lines]:match("^(%d+) cases$"))
    assert.is_number(total, "no `N cases` line: " .. tostring(lines[#lines]))
    assert.equal(#lines - 1, total)
    assert.is_true(total >= 80, "only " .. total .. " cases")
    local seen, groups = {}, {}
    for i = 1, #lines - 1 do
      local id = lines[i]:match("^(%S+) %S")
      assert.is_string(id, "bad line: " .. lines[i])
      assert.is_nil(seen[id], "duplicate id " .. id)
      seen[id] = true
      local group = id:match("^([^/]+)/")
      groups[group] = (groups[group] or 0) + 1
    end
    for _, group in ipairs({ "generic", "http2", "hpack", "abuse" }) do
      assert.is_true((groups[group] or 0) > 0, "no " .. group .. "/ cases")
    end
  end)

  it("selects cases by substring", function()
    local status, lines = run(PYTHON .. " " .. SCRIPT .. " --list --case abuse/flood/")
    assert.equal(0, status, table.concat(lines, "\n"))
    assert.equal("6 cases", lines[#lines])
  end)

  it("refuses a run without HOST and PORT", function()
    local status = run(PYTHON .. " " .. SCRIPT)
    assert.equal(2, status)
  end)
end)
