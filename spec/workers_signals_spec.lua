-- http.serve{ workers = N } (docs/http.md, moonwire/http/workers.lua): its options.

describe("http.serve option 'workers'", function()
  it("raises for anything but a positive integer (nil: one process)", function()
    local http = require "moonwire.http"
    -- (had it run a server, on_listen raises and serve returns)
    local function never() error("a server ran", 0) end
    for _, w in ipairs{ "4", 0, -1, 2.5, 2.0, true } do
      local ok, err = pcall(http.serve, { host = "127.0.0.1", port = 0, workers = w,
        handler = function() end, on_listen = never })
      assert.is_false(ok)
      assert.matches("bad option 'workers' %(positive integer expected%)", err, nil, false)
    end
  end)
end)
