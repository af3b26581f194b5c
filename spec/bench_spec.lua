-- The pieces of `moonwire bench` (docs/bench.md) without the CLI subprocess: the HDR
-- histogram in C (core.histogram: recording, percentiles at bucket resolution, merging,
-- encoding, wrk2's coordinated-omission correction), wrk-style formatting and parsing of
-- numbers, thresholds against fake results, the serializer threads hand results through, the
-- environment wrk scripts run in (wrk.format byte for byte, the wrk table, LuaJIT's `bit`),
-- option parsing, and the HTML report from fake results.

local helper = require "spec.helper"
local run = helper.run
local core = require "moonwire.core"
local fmt = require "moonwire.bench.format"
local serial = require "moonwire.bench.serial"
local wrkenv = require "moonwire.bench.wrk"
local cli = require "moonwire.bench.cli"
local report = require "moonwire.bench.report"
local url = require "moonwire.url"

local function stats(h)
  local count, min, max, mean, stdev = h:stats()
  return { count = count, min = min, max = max, mean = mean, stdev = stdev }
end

-- xorshift: reproducible pseudo-random integers in [1, n]
local function rng(seed)
  local x = seed
  return function(n)
    x = x ~ (x << 13)
    x = x ~ (x >> 7)
    x = x ~ (x << 17)
    return (x & 0x7fffffff) % n + 1
  end
end

---------------------------------------------------------------------------------------------

describe("core.histogram", function()
  it("is empty at first: zero stats, percentiles 0, no buckets", function()
    local h = core.histogram()
    assert.same({ count = 0, min = 0, max = 0, mean = 0, stdev = 0 }, stats(h))
    assert.equal(0, h:percentile(50))
    assert.equal(0, h:percentile(99.999))
    assert.same({}, h:buckets())
  end)

  it("below 2048 µs every value has its own bucket: percentiles are exact", function()
    local h = core.histogram()
    for v = 1000, 1, -1 do h:record(v) end
    local s = stats(h)
    assert.equal(1000, s.count)
    assert.equal(1, s.min)
    assert.equal(1000, s.max)
    assert.equal(500.5, s.mean)
    assert.near(math.sqrt(1000 * 1001 / 12), s.stdev, 1e-6)   -- the sample stdev of 1..n
    for p, v in pairs{ [0] = 1, [0.1] = 1, [25] = 250, [50] = 500, [75] = 750, [90] = 900, [99] = 990,
      [99.9] = 999, [100] = 1000 } do
      assert.equal(v, h:percentile(p), "p" .. p)
    end
    assert.equal(1000, h:percentile(150))     -- clamped to 100
    assert.equal(50.0, h:within(251, 750))     -- wrk's "+/- Stdev" share
    local b = h:buckets()
    assert.equal(1000, #b)
    assert.same({ 1, 1 }, b[1])
    assert.same({ 1000, 1 }, b[1000])
  end)

  it("above 2048 µs a value's bucket is within 1/1024 of it (3 significant digits)", function()
    for _, v in ipairs{ 2048, 2049, 4095, 5000, 65537, 123456, 1000003, 9876543, 2 ^ 35 + 12345 } do
      v = math.tointeger(v)
      local h = core.histogram()
      h:record(v)
      h:record(2 ^ 39 // 1)
      local p50 = h:percentile(50)
      assert.is_true(p50 >= v and p50 <= v + v / 1024, ("%d reported as %d"):format(v, p50))
      -- the largest value is reported exactly (a bucket's top is capped at the max)
      assert.equal(2 ^ 39 // 1, h:percentile(100))
      assert.same({ count = 2, min = v, max = 2 ^ 39 // 1, mean = (v + 2 ^ 39) / 2 },
        { count = h:stats(), min = select(2, h:stats()), max = select(3, h:stats()), mean = select(4, h:stats()) })
    end
  end)

  it("records counts, clamps negative values to 0, resets", function()
    local h = core.histogram()
    h:record(100, 5)
    h:record(-7)
    h:record(200, 0)
    assert.same({ count = 6, min = 0, max = 100 }, { count = h:stats(), min = select(2, h:stats()),
      max = select(3, h:stats()) })
    assert.same({ { 0, 1 }, { 100, 5 } }, h:buckets())
    h:reset()
    assert.same({ count = 0, min = 0, max = 0, mean = 0, stdev = 0 }, stats(h))
  end)

  it("merging two histograms equals recording everything in one", function()
    local r = rng(0x9E3779B97F4A7C15)
    local a, b, all = core.histogram(), core.histogram(), core.histogram()
    for i = 1, 20000 do
      local v = r(10) == 1 and r(5000000) or r(3000)       -- a body and a long tail
      if i % 3 == 0 then a:record(v) else b:record(v) end
      all:record(v)
    end
    a:merge(b)
    assert.equal(all:encode(), a:encode())
    assert.same(stats(all), stats(a))
    for _, p in ipairs{ 0, 1, 10, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 99.999, 100 } do
      assert.equal(all:percentile(p), a:percentile(p), "p" .. p)
    end
  end)

  it("merging an empty histogram changes nothing; merging into an empty one copies", function()
    local h, empty = core.histogram(), core.histogram()
    h:record(50)
    h:record(70)
    local before = h:encode()
    h:merge(empty)
    assert.equal(before, h:encode())
    assert.equal(50, select(2, h:stats()))     -- min not pulled down to the empty one's 0
    local into = core.histogram()
    into:merge(h)
    assert.equal(before, into:encode())
  end)

  it("encode/decode round-trips exactly; garbage is refused", function()
    local r = rng(12345)
    local h = core.histogram()
    for _ = 1, 5000 do h:record(r(100000000)) end
    local s = h:encode()
    local d = core.histogram_decode(s)
    assert.equal(s, d:encode())
    assert.same(stats(h), stats(d))
    assert.same(h:buckets(), d:buckets())
    assert.equal(h:percentile(99.9), d:percentile(99.9))
    -- only the non-empty buckets travel
    assert.is_true(#s < 5000 * 12 + 64)
    assert.same(stats(core.histogram()), stats(core.histogram_decode(core.histogram():encode())))
    helper.raises("not an encoded histogram", core.histogram_decode, "")
    helper.raises("not an encoded histogram", core.histogram_decode, s .. "x")
    helper.raises("not an encoded histogram", core.histogram_decode, s:sub(1, 48) .. string.pack("<I4I8", 1e8, 1))
  end)

  it("record_corrected fills in the samples a stall hid, as wrk2 does", function()
    local h = core.histogram()
    h:record_corrected(1000, 100)          -- 1000, then 900, 800, ..., 100
    local s = stats(h)
    assert.same({ 10, 100, 1000, 550.0 }, { s.count, s.min, s.max, s.mean })
    local b = h:buckets()
    for i = 1, 10 do assert.same({ 100 * i, 1 }, b[i]) end
    -- a value not longer than the interval: just itself
    for _, case in ipairs{ { 150, 100, 1 }, { 100, 100, 1 }, { 200, 100, 2 }, { 5000, 0, 1 }, { 5000, -1, 1 } } do
      local g = core.histogram()
      g:record_corrected(case[1], case[2])
      assert.equal(case[3], (g:stats()), ("record_corrected(%d, %d)"):format(case[1], case[2]))
    end
    -- the same as wrk2's loop over a stream of values
    local r = rng(777)
    local mine, theirs = core.histogram(), core.histogram()
    for _ = 1, 500 do
      local v, interval = r(50000), 1000
      mine:record_corrected(v, interval)
      theirs:record(v)
      local missing = v - interval
      while missing >= interval do
        theirs:record(missing)
        missing = missing - interval
      end
    end
    assert.equal(theirs:encode(), mine:encode())
  end)
end)

---------------------------------------------------------------------------------------------

describe("bench format helpers", function()
  it("times in wrk's style", function()
    assert.equal("0.00us", fmt.time_us(0))
    assert.equal("12.00us", fmt.time_us(12))
    assert.equal("999.00us", fmt.time_us(999))
    assert.equal("1.00ms", fmt.time_us(1000))
    assert.equal("20.29ms", fmt.time_us(20290))
    assert.equal("1.00s", fmt.time_us(1e6))
    assert.equal("2.50s", fmt.time_us(2.5e6))
  end)

  it("counts and bytes in wrk's style", function()
    assert.equal("999.00", fmt.metric(999))
    assert.equal("1.50k", fmt.metric(1500))
    assert.equal("2.50M", fmt.metric(2.5e6))
    assert.equal("3.00G", fmt.metric(3e9))
    assert.equal("512.00B", fmt.bytes(512))
    assert.equal("2.00KB", fmt.bytes(2048))
    assert.equal("3.00MB", fmt.bytes(3 * 1024 ^ 2))
    assert.equal("1.50GB", fmt.bytes(1.5 * 1024 ^ 3))
  end)

  it("parses durations with units, and counts with SI suffixes", function()
    for text, secs in pairs{ ["10s"] = 10, ["500ms"] = 0.5, ["2m"] = 120, ["1h"] = 3600, ["30"] = 30, ["1.5s"] = 1.5,
      ["250us"] = 250e-6, [" 2S "] = 2 } do
      assert.near(secs, fmt.duration(text), 1e-12, text)
    end
    assert.equal(5, fmt.duration(5))
    for _, bad in ipairs{ "abc", "10x", "", "-1s", "s" } do assert.is_nil(fmt.duration(bad), bad) end
    assert.is_nil(fmt.duration(nil))
    for text, n in pairs{ ["10k"] = 1e4, ["1.5M"] = 1.5e6, ["200"] = 200, ["2G"] = 2e9, ["3K"] = 3e3 } do
      assert.equal(n, fmt.count(text), text)
    end
    assert.equal(7, fmt.count(7))
    for _, bad in ipairs{ "x", "10q", "", "-5" } do assert.is_nil(fmt.count(bad), bad) end
  end)
end)

---------------------------------------------------------------------------------------------

describe("bench thresholds (cli.check_threshold)", function()
  -- 1000 samples: p50 = 9.999 ms, p99 = 39.999 ms, max = 900 ms (values at the top of their
  -- buckets, so the percentiles are exact)
  local function fake(opts)
    opts = opts or {}
    local h = core.histogram()
    for i = 1, 1000 do
      local v = i <= 500 and 9999 or i <= 990 and 39999 or 900000
      h:record(v)
    end
    -- (5 errors: status errors, which are responses; `socket` more, which are not)
    local requests, socket = opts.requests or 1000, opts.socket or 0
    return { latency = cli.stats_object(h), rps = opts.rps or 1234.5, requests_total = requests,
      errors_total = (opts.errors or 5) + socket, attempts = requests + socket }
  end

  local function check(expr, r)
    return cli.check_threshold(expr, r or fake())
  end

  it("latency percentiles and mean/min/max against times", function()
    assert.same({ true, "PASS p99<50ms (actual 40.00ms)" }, { check("p99<50ms") })
    assert.same({ false, "FAIL p99<30ms (actual 40.00ms)" }, { check("p99<30ms") })
    assert.is_true((check("p50<10ms")))
    assert.is_true((check("p50<=10ms")))
    assert.is_false((check("p50<9ms")))
    assert.is_true((check("p50>=9ms")))
    assert.is_false((check("p50>10ms")))
    assert.is_true((check("p99.9<1s")))
    assert.is_false((check("p99.9<500ms")))
    assert.is_true((check("p99.999<=900ms")))
    assert.is_true((check("max<1s")))
    assert.is_false((check("max<0.9s")))
    assert.is_true((check("min>5ms")))
    assert.is_true((check("mean<40ms")))      -- 5.0 + 19.6 + 9 = 33.6 ms
    assert.is_false((check("mean<30ms")))
    assert.is_true((check("  p99 < 50ms  ")))
  end)

  it("errors as a share or a count", function()
    assert.same({ true, "PASS errors<1% (actual 0.500%)" }, { check("errors<1%") })
    assert.is_false((check("errors<0.1%")))
    assert.is_true((check("errors<10")))
    assert.is_false((check("errors<5")))
    assert.is_true((check("errors<=5")))
    assert.is_true((check("errors<1%", fake{ requests = 0, errors = 0 })))
    assert.is_false((check("errors<1%", fake{ requests = 0, errors = 0, socket = 3 })))   -- all failed
    -- Regression: the share was of the responses only: 1000 connect errors and 1000
    -- responses were 100%, not 50% of what was tried
    assert.same({ true, "PASS errors<51% (actual 50.000%)" },
      { check("errors<51%", fake{ errors = 0, socket = 1000 }) })
  end)

  it("rps with SI suffixes", function()
    assert.is_true((check("rps>1000")))
    assert.is_false((check("rps>2k")))
    assert.is_true((check("rps>1.2k")))
  end)

  it("requests>N counts requests (docs: `requests>1000`)", function()
    assert.is_true((check("requests>500")), select(2, check("requests>500")))
    assert.is_true((check("requests>=1000")), select(2, check("requests>=1000")))
    assert.is_false((check("requests>1000")))
  end)

  it("unparsable expressions fail with a message naming them", function()
    assert.same({ false, "cannot parse threshold 'p99 50ms'" }, { check("p99 50ms") })
    assert.same({ false, "cannot parse threshold ''" }, { check("") })
    assert.same({ false, "bad value in threshold 'p99<soon' (a time: 100us, 50ms, 1s, 2m, 1h; a bare number is ms)" },
      { check("p99<soon") })
    assert.same({ false, "unknown metric 'latency' in threshold 'latency<5ms'" }, { check("latency<5ms") })
  end)

  -- Regression: expressions were only read after the run, and some raised there
  -- ('p99.9.9<1s': a traceback, no outputs); a percentile above 100 was taken, 'p99<1M'
  -- was a minute, and a bare number was seconds here but milliseconds in a scenario.
  -- cli.parse_threshold now runs in parse_args: what it refuses is a usage error.
  it("parse_threshold: refuses what cannot be judged; times are case-sensitive, a bare number is ms", function()
    for _, bad in ipairs { "p99.9.9<1s", "p.<1s", "p<1s", "p150<1s", "p0<1s", "latency<5ms", "p99=5ms", "p99<50xs",
      "p99<1M", "p99<", "errors<lots", "rps>fast", "p99 50ms" } do
      assert.is_nil(cli.parse_threshold(bad), bad)
      assert.is_false((check(bad)), bad)
    end
    local function limit(e) return assert(cli.parse_threshold(e), e).limit end
    assert.near(50000, limit("p99<50"), 1e-6)       -- a bare number: ms
    assert.near(50000, limit("p99<50ms"), 1e-6)
    assert.near(60e6, limit("p99<1m"), 1e-6)        -- m: minutes; M is no unit of time
    assert.near(100, limit("p100<100us"), 1e-6)
    assert.equal(0.1, limit("errors<0.1 %"))
    assert.equal(1000, limit("rps>1k"))
  end)
end)

describe("bench scenario thresholds (scenario.parse_threshold, check_threshold)", function()
  local scenario = require "moonwire.bench.scenario"
  it("refuses unknown statistics, bad percentiles and values before the run", function()
    for _, bad in ipairs { "iterations.bogus>1", "http_reqs.p99>1", "http_req_duration.bogus<1",
      "http_req_duration.p150<1s", "http_req_duration.p99.9.9<1s", "http_req_duration.p99<1M", "checks.p99>1",
      "checks>lots", "mine.bogus<1", "http_req_duration.p99=5ms", "iterations>1ms" } do
      assert.is_nil(scenario.parse_threshold(bad), bad)
    end
    for _, good in ipairs { "iterations>1k", "iterations.rate>5", "http_req_duration.p99<50ms",
      "http_req_duration.p99_9<50", "http_req_duration.count>10", "checks>99%", "http_req_failed<1%",
      "iterations.rate>1k", "iterations.rate>2.5",
      "mine.p99<5ms", "mine<3" } do
      assert.is_table(scenario.parse_threshold(good), good)
    end
  end)

  it("a bare number is the trend's unit (ms for durations), as in one process", function()
    local h = core.histogram()
    h:record(40000)    -- 40 ms (trends keep 1/1000 of their unit)
    local r = { checks = {}, metrics = { d = { kind = "trend", count = 1, _h = h, avg = 40 },
      n = { kind = "counter", value = 2.5, rate = 1 } } }
    assert.is_true((scenario.check_threshold("d.p99<50", r)))
    assert.is_true((scenario.check_threshold("d.p99<50ms", r)))
    assert.is_false((scenario.check_threshold("d.p99<0.03s", r)))
    assert.is_true((scenario.check_threshold("n>2", r)))
    -- a statistic the metric's kind does not have fails (the kind is known only after the run)
    assert.is_false((scenario.check_threshold("n.p99<1", r)))
    assert.is_false((scenario.check_threshold("d.rate<1", r)))
    -- ... and says FAIL, as every failed threshold does (a metric never recorded too)
    for _, expr in ipairs{ "n.p99<1", "d.rate<1", "never.p99<5ms" } do
      local ok, msg = scenario.check_threshold(expr, r)
      assert.is_false(ok)
      assert.matches("^FAIL " .. expr:gsub("%p", "%%%0") .. " %(", msg)
    end
  end)

  it("a check's name as bench.check gave it, spaces and all (docs: bench.check(\"status is 200\", ...))", function()
    local t = assert(scenario.parse_threshold("status is 200>99%"))
    assert.equal("status is 200", t.name)
    local r = { checks = { ["status is 200"] = { pass = 99, fail = 1 } }, metrics = {} }
    assert.is_true((scenario.check_threshold("status is 200>=99%", r)))
    assert.is_false((scenario.check_threshold(" status is 200 > 99% ", r)))
    assert.is_nil(scenario.parse_threshold(">99%"))
  end)
end)

---------------------------------------------------------------------------------------------

describe("bench JSON encoder (bench/json)", function()
  local json = require "moonwire.bench.json"
  -- Regression: strings were written byte for byte, so a name that is not valid UTF-8 (a
  -- scenario's metric or check, an error message) made the whole document invalid JSON
  it("writes valid UTF-8 whatever the strings hold: a bad byte becomes U+FFFD", function()
    local text = json.encode({ ["a\xff"] = "b\xc3", s = "\xed\xa0\x80", ok = "é ✓", t = json.array{ "x\x80" } })
    assert.is_truthy(utf8.len(text), text)
    assert.equal('{"a\u{FFFD}":"b\u{FFFD}","ok":"é ✓","s":"\u{FFFD}\u{FFFD}\u{FFFD}","t":["x\u{FFFD}"]}', text)
  end)
end)

describe("bench serializer (serial)", function()
  local function rt(v) return serial.decode(serial.encode(v)) end

  -- what it reads may come from the network (a distributed run's Redis): it is parsed as
  -- data; text that would run (a loop, a string built by code, an assignment) is refused
  it("decodes data only: no code runs", function()
    local huge = math.huge
    for _, v in ipairs { math.mininteger, math.huge, -math.huge, -0.0, 1e300, 5e-324, "a\0b\r\n\"\\\1272" } do
      assert.equal(v, serial.decode(serial.encode(v)))
    end
    for _, text in ipairs { "math.huge = 1 return 1", "while true do end", 'return ("x"):rep(2^33)',
      'return "a".."b"', "return {[1]=2}x", "return {[nil]=1,}", "return {[(0/0)]=1,}", "return 1 + 1",
      'return "unterminated', "return {[1]=2", "return" } do
      helper.raises("serial: not data", serial.decode, text)
    end
    assert.equal(huge, math.huge)
  end)

  it("round-trips plain values and nested tables", function()
    local v = {
      count = 12345, neg = -7, big = math.maxinteger, pi = math.pi, tiny = 5e-324, inf = math.huge,
      ninf = -math.huge, yes = true, no = false, s = "plain", bin = "\0\1\r\n\"\\'\255 end",
      list = { 1, 2, { 3, { 4 } } }, [1] = "one", [2.5] = "float key", [true] = "bool key",
      nested = { errors = { connect = 0, read = 1 }, statuses = { [200] = 10, [500] = 2 } },
      empty = {},
    }
    local d = rt(v)
    assert.same(v, d)
    assert.equal("integer", math.type(d.count))
    assert.equal("float", math.type(d.pi))
    assert.equal(math.pi, d.pi)
    assert.equal(5e-324, d.tiny)
    assert.equal(10, d.nested.statuses[200])
    local nan = rt(0 / 0)
    assert.is_true(nan ~= nan)
    assert.is_nil(rt(nil))
    assert.equal(("\0"):rep(100000), rt(("\0"):rep(100000)))
    local h = core.histogram()
    h:record(42)
    assert.equal(h:encode(), rt({ latency = h:encode() }).latency)
  end)

  it("keeps floats floats and integers integers (1.0, 2^53, -0.0, math.mininteger)", function()
    local problems = {}
    for _, v in ipairs{ 1.0, 2 ^ 53, -0.0, math.mininteger, 0.5, 7 } do
      local d = rt(v)
      if math.type(d) ~= math.type(v) or tostring(d) ~= tostring(v) then
        problems[#problems + 1] = ("%s (%s) came back as %s (%s)"):format(tostring(v), math.type(v), tostring(d),
          math.type(d))
      end
    end
    assert(#problems == 0, table.concat(problems, "; "))
  end)

  it("refuses what it cannot carry; decoding runs no code with access to anything", function()
    helper.raises("cannot serialize a function", serial.encode, { f = print })
    helper.raises("cannot serialize a userdata", serial.encode, io.stdout)
    helper.raises("serial: not data", serial.decode, "return os")
    helper.raises("serial: not data", serial.decode, "return os.exit(3)")
  end)
end)

---------------------------------------------------------------------------------------------

describe("bench wrk environment", function()
  -- as cli.lua builds the target
  local function target(u)
    local t = assert(url.parse(u))
    t.port_given = u:match("^%a+://[^/]*:(%d+)") and t.port or nil
    return t
  end

  local function env(u, headers)
    return wrkenv.env(target(u), headers, nil)
  end

  it("wrk.format: Host added, Content-Length only with a body, nil falls back to wrk.*", function()
    local _, wrk = env("http://127.0.0.1:8080/")
    assert.equal("GET /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n", wrk.format("GET", "/x"))
    assert.equal("POST /p HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 3\r\n\r\nabc",
      wrk.format("POST", "/p", nil, "abc"))
    assert.equal("PUT /e HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 0\r\n\r\n",
      wrk.format("PUT", "/e", {}, ""))
    assert.equal("GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", wrk.format("GET", "/", { Host = "example.org" }))
    assert.equal("GET / HTTP/1.1\r\nhost: h\r\n\r\n", wrk.format("GET", "/", { host = "h" }))
    assert.equal("POST / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Seq: 7\r\nContent-Length: 2\r\n\r\nhi",
      wrk.format("POST", "/", { ["X-Seq"] = 7 }, "hi"))
    assert.equal("GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n", wrk.format())
    -- the wrk.* fields are the defaults
    wrk.method, wrk.path, wrk.body = "PATCH", "/d", "{}"
    wrk.headers["Content-Type"] = "application/json"
    assert.equal("PATCH /d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n" ..
      "Content-Length: 2\r\n\r\n{}", wrk.format())
    -- a Content-Length of the script's own is kept
    assert.equal("POST / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 1\r\n\r\nabc",
      wrk.format("POST", "/", { ["Content-Length"] = 1 }, "abc"))
  end)

  it("Host is the URL's authority; -H headers are in wrk.headers", function()
    local _, wrk = env("http://example.com/")
    assert.equal("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", wrk.format())
    _, wrk = env("https://[::1]:8443/", { ["X-Api"] = "k" })
    assert.same({ ["X-Api"] = "k" }, wrk.headers)
    assert.equal("GET / HTTP/1.1\r\nHost: [::1]:8443\r\nX-Api: k\r\n\r\n", wrk.format())
    -- -H Host: also for a headers table of the script's own without one, as wrk's format
    _, wrk = env("http://127.0.0.1:8080/", { host = "h.test" })
    assert.equal("GET / HTTP/1.1\r\nHost: h.test\r\nX-A: 1\r\n\r\n", wrk.format("GET", "/", { ["X-A"] = 1 }))
    assert.equal("GET / HTTP/1.1\r\nHost: o.test\r\n\r\n", wrk.format("GET", "/", { Host = "o.test" }))
  end)

  it("the wrk table: scheme, host, port (a string, nil without one in the URL), method, headers, body", function()
    local _, wrk = env("https://example.com:8443/a/b")
    assert.same({ "https", "example.com", "8443", "GET", "/a/b" },
      { wrk.scheme, wrk.host, wrk.port, wrk.method, wrk.path })
    assert.is_nil(wrk.body)
    assert.same({}, wrk.headers)
    _, wrk = env("http://example.com/")
    assert.is_nil(wrk.port)
  end)

  it("wrk.path is the URL's path and query", function()
    local _, wrk = env("http://127.0.0.1:8080/search?q=moon&page=2")
    assert.equal("/search?q=moon&page=2", wrk.path)
    assert.equal("GET /search?q=moon&page=2 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n", wrk.format())
  end)

  it("counts the requests in a pipelined batch (bodies skipped by Content-Length)", function()
    local _, wrk = env("http://127.0.0.1:8080/")
    local get, post = wrk.format("GET", "/"), wrk.format("POST", "/", nil, "a\r\n\r\nb")
    assert.equal(1, wrkenv.count_requests(get))
    assert.equal(2, wrkenv.count_requests(get .. post))
    assert.equal(3, wrkenv.count_requests(post .. get .. post))
    assert.equal(0, wrkenv.count_requests(""))
    -- a Content-Length beyond the bytes (or near 2^64, which once wrapped the pointer and
    -- read out of bounds: run under ASan) ends the count there
    for _, cl in ipairs { "18446744073709550616", "18446744073709551615", "1000" } do
      local bogus = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " .. cl .. "\r\n\r\nab"
      assert.equal(1, wrkenv.count_requests(bogus))
      assert.equal(2, wrkenv.count_requests(get .. bogus .. get))
    end
  end)

  it("unpack, loadstring, bit: LuaJIT's names in a script's environment", function()
    local e = env("http://127.0.0.1:8080/")
    -- table.getn and table.maxn, which LuaJIT keeps (wrk runs `table.getn(paths)`)
    assert.equal(3, e.table.getn({ "a", "b", "c" }))
    assert.equal(7, e.table.maxn({ 1, [7] = true, x = 9 }))
    assert.same({ 1, 2, 3 }, { e.unpack({ 1, 2, 3 }) })
    assert.equal(42, e.loadstring("return 6 * 7")())
    local bit = e.bit
    assert.equal(12, bit.band(0xff, 0x0f, 0x3c))
    assert.equal(7, bit.bor(1, 2, 4))
    assert.equal(6, bit.bxor(5, 3))
    assert.equal(-1, bit.bnot(0))
    assert.equal(16, bit.lshift(1, 4))
    assert.equal(16, bit.rshift(256, 4))
    assert.equal(15, bit.rshift(-1, 28))
    assert.equal(-1, bit.tobit(0xffffffff))
    assert.equal(0x12345678, bit.tobit(0x112345678))
    assert.equal("000000ff", bit.tohex(255))
    assert.equal("ffffffff", bit.tohex(-1))
    assert.equal("ff", bit.tohex(255, 2))
    -- the script's globals stay in its own environment
    e.mine = 1
    assert.is_nil(rawget(_G, "mine"))
    assert.equal(e, e._G)
  end)

  it("bit results are signed 32-bit numbers, as LuaJIT's bit gives them", function()
    local bit = env("http://127.0.0.1:8080/").bit
    local problems = {}
    for _, case in ipairs{
      { "lshift(1, 31)", bit.lshift(1, 31), -2147483648 },
      { "lshift(0x7fffffff, 1)", bit.lshift(0x7fffffff, 1), -2 },
      { "arshift(-256, 4)", bit.arshift(-256, 4), -16 },
      { "arshift(0x80000000, 31)", bit.arshift(0x80000000, 31), -1 },
      { "bor(0x80000000, 0)", bit.bor(0x80000000, 0), -2147483648 },
      { "band(0xffffffff, 0xffffffff)", bit.band(0xffffffff, 0xffffffff), -1 },
      { "bxor(0x0fffffff, 0xf0000000)", bit.bxor(0x0fffffff, 0xf0000000), -1 },
      { "bnot(0xffffffff)", bit.bnot(0xffffffff), 0 },
      { "bnot(2^32)", bit.bnot(0x100000000), -1 },
    } do
      if case[2] ~= case[3] then
        problems[#problems + 1] = ("bit.%s = %s, LuaJIT gives %s"):format(case[1], tostring(case[2]), case[3])
      end
    end
    assert(#problems == 0, table.concat(problems, "\n"))
  end)

  it("wrk.lookup resolves a host and a service; tostring gives ip:port; wrk.connect tests one", function()
    run(function()
      local l, port = helper.listen()
      local _l <close> = helper.closer(l)
      local _, wrk = env("http://127.0.0.1:" .. port .. "/")
      local addrs = wrk.lookup("127.0.0.1", tostring(port))
      assert.equal("127.0.0.1:" .. port, tostring(addrs[1]))
      assert.is_true(wrk.connect(addrs[1]))
      local closed = wrk.lookup("127.0.0.1", helper.free_port())
      assert.is_false(wrk.connect(closed[1]))
      if helper.has_ipv6() then
        assert.equal("[::1]:" .. port, tostring(wrk.lookup("::1", port)[1]))
      end
      -- a service name, as wrk's own scripts pass `wrk.port or "http"`
      assert.equal("127.0.0.1:80", tostring(wrk.lookup("127.0.0.1", "http")[1]))
      assert.equal("127.0.0.1:443", tostring(wrk.lookup("127.0.0.1", "https")[1]))
    end)
  end)
end)

---------------------------------------------------------------------------------------------

describe("bench option parsing (cli.parse_args)", function()
  it("takes wrk's flags, attached or not, and long options with =", function()
    local o = cli.parse_args{ "-t4", "-c", "100", "-d30s", "--latency", "--timeout=500ms", "-H", "X-A: 1",
      "-H", "Accept:  text/plain ", "-R", "2k", "--json=-", "--threshold", "p99<5ms", "http://h:1/", "--", "a", "b" }
    assert.same({ 4, 100, 30, true, 0.5, 2000, "-", { "p99<5ms" }, "http://h:1/", { "a", "b" } },
      { o.threads, o.connections, o.duration, o.latency, o.timeout, o.rate, o.json, o.thresholds, o.url,
        o.script_args })
    assert.same({ ["X-A"] = "1", Accept = "text/plain" }, o.headers)
    assert.same({ 10, 2, 10, 2, 1 }, (function()
      local d = cli.parse_args{ "http://h/" }
      return { d.connections, d.threads, d.duration, d.timeout, d.pipeline }
    end)())
    assert.equal("POST", cli.parse_args{ "-m", "post", "http://h/" }.method)
  end)

  -- Regression: with --scenario, -d, -R, -c and a URL (among others) were taken and ignored
  it("refuses with --scenario the options of a URL run, and a URL", function()
    assert.is_table(cli.parse_args{ "--scenario", "s.lua", "-t2", "--json", "-", "--threshold", "checks>99%" })
    for _, case in ipairs{ { "-d", "5s" }, { "-R", "100" }, { "-c", "10" }, { "--pipeline", "2" }, { "-s", "x.lua" },
      { "--timeout", "1s" }, { "-H", "A: b" }, { "--h2" } } do
      local argv = { "--scenario", "s.lua", case[1], case[2] }
      local ok, err = pcall(cli.parse_args, argv)
      assert.is_false(ok, case[1])
      assert.matches("--scenario does not take " .. case[1], err, 1, true)
    end
    local ok, err = pcall(cli.parse_args, { "--scenario", "s.lua", "http://h/" })
    assert.is_false(ok)
    assert.matches("--scenario takes no URL", err, 1, true)
  end)

  it("refuses bad values", function()
    for _, argv in ipairs{ { "-c", "0", "u" }, { "-d", "soon", "u" }, { "-t", "x", "u" }, { "-c1", "-t2", "u" },
      { "--frobnicate", "u" }, { "-H", "no colon", "u" }, { "-R", "10", "--pipeline", "2", "u" }, { "-c" } } do
      assert.is_false(pcall(cli.parse_args, argv), table.concat(argv, " "))
    end
  end)
end)

---------------------------------------------------------------------------------------------

describe("bench HTML report (report.html) from fake results", function()
  local function has(h, text)
    assert(h:find(text, 1, true), "the report lacks " .. text)
  end

  local function lacks(h, pat)
    local at = h:find(pat)
    assert(not at, ("the report has %s: ...%s..."):format(pat, at and h:sub(at - 40, at + 40)))
  end

  local function results(opts)
    opts = opts or {}
    local h = core.histogram()
    if not opts.empty then
      for i = 1, 10000 do h:record(i <= 9900 and 200 + i % 50 or 150000) end
    end
    local req = core.histogram()
    req:record(5000)
    local tl = {}
    if not opts.empty then
      for s = 1, 5 do
        tl[s] = { t = s + 0.001, rps = 2000 - s, p50 = 220, p99 = 150000, max = 151000, errors = s == 3 and 7 or 0 }
      end
    end
    return {
      latency = cli.stats_object(h), requests = cli.stats_object(req), requests_total = opts.empty and 0 or 10000,
      bytes = opts.empty and 0 or 1234567, duration_us = 5000000, rps = opts.empty and 0 or 2000,
      errors = { connect = opts.empty and 4 or 0, read = 0, write = 0, status = 7, timeout = 0 },
      errors_total = 7, statuses = opts.empty and {} or { [200] = 9993, [503] = 7 }, hung = 0, timeline = tl,
      threshold_results = { { expr = "p99<50ms", pass = false, message = "FAIL p99<50ms (actual 150.00ms)" },
        { expr = "errors<1%", pass = true, message = "PASS errors<1% (actual 0.070%)" } },
      metrics = opts.metrics,
    }
  end

  local opts = { url = "http://127.0.0.1:8080/a?b=<c>&d=\"e\"", threads = 2, connections = 50, duration = 5,
    rate = 2000, pipeline = 1, timeout = 2 }

  -- Regression: the errors card divided by the responses only (10,000 connect errors and
  -- 10,000 responses showed 100.07%)
  it("the errors card is a share of the attempts (responses and requests that got none)", function()
    local r = results()
    r.errors.connect, r.errors_total, r.attempts = 10000, 10007, 20000
    has(report.html(opts, r), "50.035% of attempts")
  end)

  it("is one page with the settings, summary, charts and thresholds, nothing fetched", function()
    local h = report.html(opts, results())
    assert.matches("^<!DOCTYPE html>", h)
    assert.equal(1, select(2, h:gsub("<html", "")))
    assert.matches("</html>\n$", h)
    for _, pat in ipairs{ "<script", "<link", "<img", "src=", "href=", "@import", "url%(" } do lacks(h, pat) end
    -- the URL is escaped everywhere
    lacks(h, "<c>")
    has(h, "http://127.0.0.1:8080/a?b=&lt;c&gt;&amp;d=&quot;e&quot;")
    for _, text in ipairs{ "threads <b>2</b>", "connections <b>50</b>", "duration <b>5s</b>",
      "rate <b>2,000 req/s (constant, open model)</b>", "10,000", "1.18 MiB", "Latency by percentile",
      "99.999%", "150.0 ms", "Latency over time", "Throughput over time", "errors per second", "503",
      "p99&lt;50ms", "1 of 2 thresholds failed", "latency (ms)" } do
      has(h, text)
    end
    assert.equal(3, select(2, h:gsub("<svg ", "")))
    -- one error bar (second 3)
    assert.equal(1, select(2, h:gsub('class="errbar"', "")))
  end)

  it("an empty run (nothing answered) gives a page without NaN or infinities", function()
    local h = report.html({ url = "http://127.0.0.1:1/", threads = 1, connections = 1, duration = 1 },
      results{ empty = true })
    lacks(h:lower(), "%f[%a]nan%f[%A]")
    lacks(h:lower(), "%f[%a]inf%f[%A]")
    has(h, "No latency samples were recorded.")
    has(h, "too short for a per-second timeline")
    has(h, "No responses.")
  end)

  it("a scenario's metrics: trends, counters and checks in tables", function()
    local h = report.html({ scenario = "users.lua", threads = 2, duration = 20 }, results{ metrics = {
      http_req_duration = { kind = "trend", p50 = 1.5, p90 = 3, p95 = 4.25, p99 = 9, avg = 2, min = 0.5, max = 20,
        count = 1000 },
      pages = { kind = "counter", value = 321 },
      ["status is 200"] = { kind = "check", passes = 990, fails = 10 },
      weird = { kind = "gauge", value = 3 },
    } })
    has(h, "<title>moonwire bench: scenario users.lua</title>")
    for _, text in ipairs{ "Metrics", "Trends", "http_req_duration", "4.25 ms", "20.00 ms", "Counters", "pages",
      "321", "Checks", "status is 200", "990", "99.00%", "weird", "kind = gauge" } do
      has(h, text)
    end
  end)
end)
