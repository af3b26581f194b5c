-- done(summary, latency, requests): the run's totals and the two statistics objects, with
-- their fields, percentile(), the i-th bucket as latency(i) and the bucket count as #latency.

local function p(k, v)
  print(("@%s=%s"):format(k, tostring(v)))
end

function done(summary, latency, requests)
  p("duration", summary.duration)
  p("requests", summary.requests)
  p("bytes", summary.bytes)
  for _, k in ipairs{ "connect", "read", "write", "status", "timeout" } do
    p("errors." .. k, summary.errors[k])
  end
  for _, k in ipairs{ "min", "max", "mean", "stdev" } do
    p("latency." .. k, latency[k])
    p("requests." .. k, requests[k])
  end
  p("latency.p50", latency:percentile(50))
  p("latency.p99", latency:percentile(99))
  p("latency.p99.999", latency:percentile(99.999))
  p("requests.p50", requests:percentile(50))
  p("latency.buckets", #latency)
  p("requests.buckets", #requests)
  local v1, c1 = latency(1)
  p("latency.first_value", v1)
  p("latency.first_count", c1)
  local vn = latency(#latency)
  p("latency.last_value", vn)
  local samples, prev, sorted = 0, -1, true
  for i = 1, #latency do
    local v, c = latency(i)
    samples = samples + c
    if v <= prev then sorted = false end
    prev = v
  end
  p("latency.samples", samples)
  p("latency.sorted", sorted)
end
