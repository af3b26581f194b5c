-- moonwire bench on a terminal: the live progress line, and the run ends by itself.
-- Regression: the progress task ignored its cancellation and kept the loop (and the
-- process) alive after the report was printed. `script` gives the run a terminal.

local helper = require "spec.helper"
local mw = helper.mw
local run = helper.run
local http = require "moonwire.http"

local readfile = helper.readfile

describe("moonwire bench on a terminal", function()
  it("prints a live progress line and exits after its report", function()
    run(function()
      local srv = assert(http.server{ host = "127.0.0.1", port = 0, handler = function(_, res) res:send("ok") end })
      local base = os.tmpname()
      local out, rc = base .. ".out", base .. ".rc"
      finally(function() os.remove(base) os.remove(out) os.remove(rc) end)
      local preload = os.getenv("MW_ASAN_PRELOAD")
      local env = ("LUA_PATH=%q LUA_CPATH=%q"):format(package.path, package.cpath)
      -- under ASan only lua5.4 gets the sanitizer runtime, not `timeout` or `script`
      local lua = preload and ("env LD_PRELOAD=" .. preload .. " lua5.4") or "lua5.4"
      local cmd = ("env %s timeout 20 script -qfec '%s bin/moonwire bench -t1 -c2 -d1.5s http://127.0.0.1:%d/' %s"
        .. " >/dev/null 2>&1 </dev/null; echo $? > %s.tmp; mv %s.tmp %s"):format(env, lua, srv.port, out, rc, rc, rc)
      assert(os.execute("(" .. cmd .. ") &"))
      local code
      for _ = 1, 1000 do
        code = readfile(rc)
        if code and code:match("%d") then break end
        mw.sleep(0.02)
      end
      srv:close()
      assert.equal("0", code and code:match("%d+"), "bench did not end by itself")
      local text = readfile(out)
      assert.matches("req/s  errors 0", text, 1, true)
      assert.matches("Requests/sec:", text, 1, true)
    end, 30)
  end)
end)
