-- RESP (src/resp.c, src/redis.c), without sockets: every RESP2/RESP3 type decoded to the
-- documented Lua value, the same whole, byte by byte and in every two-piece split; limits
-- (bulk size, nesting depth, line length) and malformed input give clear errors; feeding is
-- linear (a 100 MB bulk in 16 KiB pieces, a long array in small pieces); the command
-- encoder; and the differential test against hiredis 0.14's reader (fuzz/resp_diff.c).

local helper = require "spec.helper"
local core = require "moonwire.core"
local redis = require "moonwire.redis"

local null = redis.null

local function decode_all(bytes, opts)
  local d = core.resp_decoder(opts)
  d:feed(bytes)
  local out = {}
  while true do
    local v, t, code = d:next()
    if v == nil then
      if t then out.err, out.code = t, code end
      break
    end
    out[#out + 1] = { v, t }
  end
  return out
end

local function decode_pieces(bytes, cuts, opts)
  local d = core.resp_decoder(opts)
  local out = {}
  local from = 1
  cuts[#cuts + 1] = #bytes
  for _, to in ipairs(cuts) do
    d:feed(bytes:sub(from, to))
    from = to + 1
    while true do
      local v, t, code = d:next()
      if v == nil then
        if t then out.err, out.code = t, code; return out end
        break
      end
      out[#out + 1] = { v, t }
    end
  end
  return out
end

-- a comparable rendering (NaN ~= NaN; error objects by message)
local function render(v)
  if v ~= v then return "nan" end
  if v == null then return "null" end
  if redis.is_error(v) then return "error(" .. v.message .. ")" end
  if type(v) == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    local parts = {}
    for _, k in ipairs(keys) do parts[#parts + 1] = render(k) .. "=" .. render(v[k]) end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return type(v) .. ":" .. (math.type(v) or "") .. ":" .. tostring(v)
end

local function render_all(out)
  local parts = {}
  for i, e in ipairs(out) do parts[i] = e[2] .. render(e[1]) end
  return table.concat(parts, " ") .. (out.err and (" ERR " .. out.err) or "")
end

local CASES = {
  { "simple string", "+OK\r\n", "OK", "+" },
  { "empty simple string", "+\r\n", "", "+" },
  { "integer", ":-9223372036854775808\r\n", math.mininteger, ":" },
  { "bulk string with CRLF inside", "$8\r\na\r\nb\r\n\0z\r\n", "a\r\nb\r\n\0z", "$" },
  { "empty bulk", "$0\r\n\r\n", "", "$" },
  { "null bulk", "$-1\r\n", null, "_" },
  { "null array", "*-1\r\n", null, "_" },
  { "RESP3 null", "_\r\n", null, "_" },
  { "array", "*3\r\n:1\r\n$1\r\nx\r\n*0\r\n", { 1, "x", {} }, "*" },
  { "map", "%2\r\n+a\r\n:1\r\n$1\r\nb\r\n,2.5\r\n", { a = 1, b = 2.5 }, "%" },
  { "set", "~2\r\n+x\r\n+y\r\n", { "x", "y" }, "~" },
  { "true", "#t\r\n", true, "#" },
  { "false", "#f\r\n", false, "#" },
  { "double", ",1.5e3\r\n", 1500.0, "," },
  { "double inf", ",inf\r\n", math.huge, "," },
  { "double -inf", ",-inf\r\n", -math.huge, "," },
  { "big number", "(3492890328409238509324850943850943825024385\r\n",
    "3492890328409238509324850943850943825024385", "(" },
  { "verbatim string", "=15\r\ntxt:Some string\r\n", "Some string", "=" },
  { "push", ">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nkey\r\n", { "invalidate", { "key" } }, ">" },
  { "attribute before a reply", "|1\r\n+ttl\r\n:3600\r\n*2\r\n:2\r\n:3\r\n", { 2, 3 }, "*" },
  { "attribute inside an array", "*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n", { 1, 2 }, "*" },
  { "map with a null key", "%1\r\n_\r\n:1\r\n", { null = 1 }, "%" },
}

describe("RESP decoder", function()
  for _, c in ipairs(CASES) do
    it("decodes " .. c[1], function()
      local out = decode_all(c[2])
      assert.is_nil(out.err)
      assert.equal(1, #out)
      assert.equal(c[4], out[1][2])
      assert.equal(render(c[3]), render(out[1][1]))
    end)
  end

  it("decodes NaN", function()
    local v = decode_all(",nan\r\n")[1][1]
    assert.is_true(v ~= v)
  end)

  it("decodes error replies as error objects, simple and blob", function()
    local out = decode_all("-ERR bad thing\r\n!21\r\nSYNTAX invalid syntax\r\n*1\r\n-WRONGTYPE x\r\n")
    assert.is_true(redis.is_error(out[1][1]))
    assert.equal("ERR bad thing", out[1][1].message)
    assert.equal("-", out[1][2])
    assert.equal("SYNTAX invalid syntax", out[2][1].message)
    assert.equal("!", out[2][2])
    assert.equal("WRONGTYPE x", out[3][1][1].message)
    assert.matches("ERR bad thing", tostring(out[1][1]))
  end)

  -- every type, concatenated: whole == byte by byte == every split in two
  local all = {}
  for _, c in ipairs(CASES) do all[#all + 1] = c[2] end
  all = table.concat(all) .. ",nan\r\n-ERR e\r\n!3\r\nabc\r\n"

  it("gives the same values byte by byte as whole (every RESP3 type)", function()
    local whole = render_all(decode_all(all))
    local cuts = {}
    for i = 1, #all - 1 do cuts[i] = i end
    assert.equal(whole, render_all(decode_pieces(all, cuts)))
    assert.equal(#CASES + 3, #decode_all(all))
  end)

  it("gives the same values for every split in two pieces", function()
    local whole = render_all(decode_all(all))
    for i = 1, #all - 1 do
      assert.equal(whole, render_all(decode_pieces(all, { i })), "split at " .. i)
    end
  end)

  it("gives the same errors whatever the split", function()
    -- (a long line ended by a bare LF: found by fuzz/resp.c, where whole feeding said "line not
    -- ended by CRLF" and smaller pieces "line too long")
    for _, bad in ipairs { "*2\r\n:1\r\n:x\r\n", "+" .. ("a"):rep(100) .. "\r\n", "$3\r\nabcd\r\n",
                           "+" .. ("a"):rep(100) .. "\n" } do
      local whole = render_all(decode_all(bad, { max_bulk = 8 }))
      assert.matches("ERR", whole)
      for i = 1, #bad - 1 do
        assert.equal(whole, render_all(decode_pieces(bad, { i }, { max_bulk = 8 })))
      end
    end
  end)

  it("needs more bytes for an incomplete reply and keeps them", function()
    local d = core.resp_decoder()
    d:feed("*2\r\n$5\r\nhel")
    assert.is_nil(d:next())
    assert.equal(11, d:buffered())
    d:feed("lo\r\n:7\r\n+next")
    local v, t = d:next()
    assert.same({ "hello", 7 }, v)
    assert.equal("*", t)
    assert.is_nil(d:next())
  end)

  local BAD = {
    { "an unknown type byte", "?x\r\n", "unknown reply type" },
    { "a bad integer", ":12a\r\n", "bad integer" },
    { "an integer with a plus sign", ":+1\r\n", "bad integer" },
    { "an integer that overflows", ":9223372036854775808\r\n", "bad integer" },
    { "a leading zero", "*01\r\n:1\r\n", "bad aggregate length" },
    { "a negative bulk length", "$-2\r\n", "bad bulk length" },
    { "a bulk not followed by CRLF", "$3\r\nabcde\r\n", "bulk string not followed by CRLF" },
    { "a bare LF", "+OK\n", "line not ended by CRLF" },
    { "a bad boolean", "#x\r\n", "bad boolean" },
    { "a bad double", ",1.2.3\r\n", "bad double" },
    { "a hex double", ",0x10\r\n", "bad double" },
    { "a bad null", "_x\r\n", "bad null" },
    { "a bad big number", "(12a\r\n", "bad big number" },
    { "a verbatim string without format", "=3\r\nabc\r\n", "bad verbatim string" },
    { "a verbatim string without colon", "=5\r\ntxtab\r\n", "bad verbatim string" },
    { "a null map", "%-1\r\n", "bad aggregate length" },
  }
  for _, c in ipairs(BAD) do
    it("rejects " .. c[1], function()
      local out = decode_all(c[2])
      assert.equal(0, #out)
      assert.equal(c[3], out.err)
      assert.equal("protocol", out.code)
    end)
  end

  it("rejects an unknown type byte at once, before its line ends", function()
    local d = core.resp_decoder()
    d:feed("HTTP/1.1 400")
    local v, err, code = d:next()
    assert.is_nil(v)
    assert.equal("unknown reply type", err)
    assert.equal("protocol", code)
  end)

  it("limits bulk sizes (max_bulk) before the bytes arrive", function()
    local d = core.resp_decoder { max_bulk = 1024 }
    d:feed("$1025\r\n")
    helper.fails("protocol", d:next())
    d = core.resp_decoder { max_bulk = 1024 }
    d:feed("$1024\r\n" .. ("x"):rep(1024) .. "\r\n")
    assert.equal(1024, #d:next())
  end)

  it("limits line lengths (max_bulk) before the line ends", function()
    local d = core.resp_decoder { max_bulk = 64 }
    d:feed("+" .. ("a"):rep(200))
    local _, err = d:next()
    assert.equal("line too long", err)
  end)

  it("limits nesting depth (max_depth)", function()
    local nest = function(n) return ("*1\r\n"):rep(n) .. ":1\r\n" end
    assert.equal(1, #decode_all(nest(4), { max_depth = 4 }))
    assert.equal("nesting too deep", decode_all(nest(5), { max_depth = 4 }).err)
    assert.equal("nesting too deep", decode_all(nest(33)).err)   -- default 32
    assert.equal(1, #decode_all(nest(128), { max_depth = 128 }))
    helper.raises("max_depth", core.resp_decoder, { max_depth = 129 })
    helper.raises("max_bulk", core.resp_decoder, { max_bulk = 0 })
  end)

  it("counts aggregate elements without allocating for the announced count", function()
    local d = core.resp_decoder()
    d:feed("*2147483647\r\n:1\r\n")
    assert.is_nil(d:next())          -- waits: the elements have not come
    assert.equal("bad aggregate length", decode_all("*2147483648\r\n").err)
  end)

  -- Linear feeding: a resumable scan looks at each new piece once. A parser that rescanned
  -- from the reply's start would read ~300 GB for the first case and ~2 GB for the second:
  -- minutes, not the fraction of a second this takes.
  it("is linear for a 100 MB bulk arriving in 16 KiB pieces", function()
    local size = 100 * 1024 * 1024
    local piece = ("x"):rep(16384)
    local d = core.resp_decoder()
    local t0 = os.clock()
    d:feed("$" .. size .. "\r\n")
    local got
    for _ = 1, size // 16384 do
      d:feed(piece)
      got = d:next()
      assert.is_nil(got)
    end
    d:feed("\r\n")
    got = d:next()
    assert.equal(size, #got)
    assert.is_true(os.clock() - t0 < 5, "took " .. (os.clock() - t0) .. " s")
  end)

  it("is linear for a 500,000-element array arriving in 4 KiB pieces", function()
    local n = 500000
    local bytes = "*" .. n .. "\r\n" .. (":1\r\n"):rep(n)
    local d = core.resp_decoder()
    local t0 = os.clock()
    local got
    for i = 1, #bytes, 4096 do
      d:feed(bytes:sub(i, i + 4095))
      got = d:next() or got
    end
    assert.equal(n, #got)
    assert.is_true(os.clock() - t0 < 5, "took " .. (os.clock() - t0) .. " s")
  end)
end)

describe("RESP encoder", function()
  it("encodes a command as an array of bulk strings", function()
    assert.equal("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nv\r\nv\n\r\n", core.resp_encode("SET", "k", "v\r\nv\n"))
  end)

  it("encodes numbers: integers exactly, floats round-trip", function()
    assert.equal("*4\r\n$4\r\nINCR\r\n$20\r\n-9223372036854775808\r\n$3\r\n0.1\r\n$3\r\ninf\r\n",
      core.resp_encode("INCR", math.mininteger, 0.1, math.huge))
    local s = core.resp_encode("X", 1 / 3)
    assert.equal(1 / 3, tonumber(s:match("\r\n%$%d+\r\n([^\r]+)\r\n$")))
  end)

  it("encodes long arguments whole", function()
    local big = ("a"):rep(100000)
    local out = decode_all(core.resp_encode("SET", "k", big))
    assert.same({ "SET", "k", big }, out[1][1])
  end)

  it("raises naming the argument for tables, nil, booleans", function()
    helper.raises("bad argument #2 to 'encode' (string or number expected, got table)",
      core.resp_encode, "SET", "k", {})
    helper.raises("bad argument #1 to 'encode' (string or number expected, got nil)",
      core.resp_encode, "GET", nil)
    helper.raises("bad argument #1 to 'encode' (string or number expected, got boolean)",
      core.resp_encode, "GET", true)
    helper.raises("bad command name", core.resp_encode)
  end)
end)

describe("RESP differential test against hiredis 0.14", function()
  it("agrees with hiredis's reader on generated RESP2 (byte by byte vs whole) and mutations", function()
    local exe = os.tmpname()
    local ok = os.execute(("cc -O1 -std=gnu11 -DRESP_DIFF_MAIN -o %s fuzz/resp_diff.c src/resp.c -lhiredis 2>&1")
      :format(exe))
    assert.is_true(ok == true or ok == 0, "could not build fuzz/resp_diff.c (libhiredis-dev installed?)")
    local p = io.popen(exe .. " 20000 12345 2>&1")
    local out = p:read("a")
    local _, _, status = p:close()
    os.remove(exe)
    assert.equal(0, status, out)
    local n = tonumber(out:match("compared (%d+) replies"))
    assert.is_true(n and n > 50000, out)
    assert.matches("all identical", out)
  end)
end)
