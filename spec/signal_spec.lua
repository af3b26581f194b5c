-- Signals (docs/api.md mw.signal). Each case runs in a child `lua5.4` process, so a broken
-- handler (the default disposition killing the process) cannot take the test runner down.

local helper = require "spec.helper"

describe("mw.signal", function()
  it("runs the handler in a new task each time the signal arrives", function()
    local out, how, status = helper.subprocess([[
      local mw = require "moonwire"
      local f = io.open("/proc/self/stat"); local pid = f:read("n"); f:close()
      mw.run(function()
        local ch = mw.channel(10)
        mw.signal("SIGUSR1", function(name)
          ch:send(name .. (mw.current() and " in a task" or " outside a task"))
        end)
        for i = 1, 2 do
          os.execute("kill -USR1 " .. math.tointeger(pid))
          print(i, ch:recv(5))
        end
        mw.signal("SIGUSR1", nil)
      end)
      print("survived")
    ]])
    assert.matches("1\tSIGUSR1 in a task", out, 1, true)
    assert.matches("2\tSIGUSR1 in a task", out, 1, true)
    assert.matches("survived", out)
    assert.same({ "exit", 0 }, { how, status })
  end)

  it("does not keep run alive", function()
    local out, how, status = helper.subprocess([[
      local mw = require "moonwire"
      mw.run(function() mw.signal("SIGUSR2", function() end) end)
      print("run returned")
      mw.signal("SIGUSR2", nil)
    ]], 5)
    assert.matches("run returned", out)
    assert.same({ "exit", 0 }, { how, status })
  end)

  it("restores the default disposition when the handler is removed", function()
    local out, how, status = helper.subprocess([[
      local mw = require "moonwire"
      local f = io.open("/proc/self/stat"); local pid = f:read("n"); f:close()
      mw.run(function()
        mw.signal("SIGTERM", function() end)
        mw.signal("SIGTERM", nil)
        io.stdout:write("removed\n"); io.stdout:flush()
        os.execute("kill -TERM " .. math.tointeger(pid))
        mw.sleep(2)
        print("still running")
      end)
    ]])
    assert.matches("removed", out)
    assert.not_matches("still running", out)
    -- killed by SIGTERM: reported as the signal, or as status 128 + 15 by `timeout`/the shell
    assert.is_true((how == "signal" and status == 15) or (how == "exit" and status == 143),
      "child ended with " .. tostring(how) .. " " .. tostring(status))
  end)
end)
