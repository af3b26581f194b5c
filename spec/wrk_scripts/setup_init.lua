-- setup(thread) in the main state gives every thread values through thread:set; init(args) in
-- each thread's own state sees them as globals, and gets the URL (args[0]) and the words after
-- `--`. init() changes wrk.path: the request built after init() uses it for the whole run.
-- done() reads back, through thread:get, what init() saw.
-- luacheck: globals tag cfg seen_args seen_count seen_url seen_cfg

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
  local n = #threads
  thread:set("tag", "t" .. n)
  thread:set("cfg", { n = n, list = { "a", "b" }, flag = true, ratio = 0.5 })
end

function init(args)
  seen_args = table.concat(args, ",")
  seen_count = #args
  seen_url = args[0]
  seen_cfg = ("%d/%s/%s/%s"):format(cfg.n, cfg.list[2], tostring(cfg.flag), tostring(cfg.ratio))
  wrk.path = "/" .. tag
end

function done()
  print("@threads=" .. #threads)
  for i, t in ipairs(threads) do
    print(("@%d.tag=%s"):format(i, tostring(t:get("tag"))))
    print(("@%d.args=%s"):format(i, tostring(t:get("seen_args"))))
    print(("@%d.count=%s"):format(i, tostring(t:get("seen_count"))))
    print(("@%d.url=%s"):format(i, tostring(t:get("seen_url"))))
    print(("@%d.cfg=%s"):format(i, tostring(t:get("seen_cfg"))))
    print(("@%d.addr=%s"):format(i, tostring(t.addr)))
  end
end
