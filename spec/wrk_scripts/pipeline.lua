-- request() builds two requests with wrk.format and returns them together: they are written
-- at once (pipelined), and each response is counted. The second one has a body and a header
-- that name the batch, so the server can check they travel together.
local n = 0

function request()
  n = n + 1
  return wrk.format("GET", "/a?i=" .. n) ..
    wrk.format("POST", "/b", { ["X-Seq"] = tostring(n) }, "payload-" .. n)
end
