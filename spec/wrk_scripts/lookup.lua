-- wrk.lookup and wrk.connect in setup(), as wrk's own address-picking scripts use them: the
-- first thread gets the URL's (reachable) address, the second an address where nothing
-- listens (its port comes from the environment), so only that thread has connect errors.

local good, closed

function setup(thread)
  if not good then
    local addrs = wrk.lookup(wrk.host, wrk.port)
    print("@lookup_count=" .. #addrs)
    print("@lookup_first=" .. tostring(addrs[1]))
    for i = #addrs, 1, -1 do
      if not wrk.connect(addrs[i]) then table.remove(addrs, i) end
    end
    print("@reachable=" .. #addrs)
    good = addrs[1]
    closed = wrk.lookup("127.0.0.1", os.getenv("BENCH_CLOSED_PORT"))[1]
    print("@closed=" .. tostring(closed))
    print("@closed_connect=" .. tostring(wrk.connect(closed)))
    thread.addr = good
  else
    thread.addr = closed
  end
end

-- each thread reads the address setup() gave it as wrk.thread.addr (wrk's scripts/addr.lua)
function init()
  local addr = tostring(wrk.thread.addr)
  print("@thread_addr." .. addr:match(":(%d+)$") .. "=" .. addr)
end
