-- moonwire.url (docs/client.md "URLs"): url.parse (scheme, userinfo, host, IPv6 literals,
-- ports, path/query/fragment, target, authority), url.resolve (RFC 3986 section 5.4 reference
-- resolution, dot segments), url.encode/decode, url.build_query/parse_query.
-- Pure functions: no loop, no sockets.

local url = require "moonwire.url"

-- The fields of a parsed URL that the docs list (ipv6 and other extras left out).
local function fields(u)
  return { scheme = u.scheme, user = u.user, password = u.password, host = u.host, port = u.port,
           path = u.path, query = u.query, fragment = u.fragment, target = u.target,
           authority = u.authority }
end

local function parses(s)
  local u, err = url.parse(s)
  assert(u, ("url.parse(%q) failed: %s"):format(s, tostring(err)))
  return fields(u)
end

local function rejects(s)
  local u, err = url.parse(s)
  assert.is_nil(u, ("url.parse(%q) accepted a bad URL"):format(s))
  assert.is_string(err)
  return err
end

describe("url.parse", function()
  it("splits a full URL into its parts", function()
    assert.same({ scheme = "http", user = "alice", password = "secret", host = "example.com",
                  port = 8080, path = "/a/b.html", query = "x=1&y=2", fragment = "top",
                  target = "/a/b.html?x=1&y=2", authority = "example.com:8080" },
      parses("http://alice:secret@example.com:8080/a/b.html?x=1&y=2#top"))
  end)

  it("defaults: port from the scheme, path '/', no query, no fragment", function()
    assert.same({ scheme = "http", host = "example.com", port = 80, path = "/", target = "/",
                  authority = "example.com" }, parses("http://example.com"))
    assert.same({ scheme = "http", host = "example.com", port = 80, path = "/", target = "/",
                  authority = "example.com" }, parses("http://example.com/"))
    local u = parses("https://example.com/x")
    assert.equal(443, u.port)
    assert.equal("example.com", u.authority)
  end)

  it("lower-cases the scheme and the host, keeps the path's case", function()
    local u = parses("HTTP://ExAmPle.COM/Some/Path?Q=V")
    assert.equal("http", u.scheme)
    assert.equal("example.com", u.host)
    assert.equal("/Some/Path", u.path)
    assert.equal("Q=V", u.query)
  end)

  it("a query without a path gets the path '/'", function()
    local u = parses("http://h?x=1")
    assert.equal("/", u.path)
    assert.equal("x=1", u.query)
    assert.equal("/?x=1", u.target)
  end)

  it("the fragment is never part of the target (a '?' after '#' belongs to the fragment)", function()
    local u = parses("http://h/p#frag?notquery")
    assert.equal("/p", u.path)
    assert.is_nil(u.query)
    assert.equal("frag?notquery", u.fragment)
    assert.equal("/p", u.target)
    u = parses("http://h/p?q=1#f")
    assert.equal("/p?q=1", u.target)
    assert.equal("f", u.fragment)
  end)

  it("keeps percent-encoding in the path and query as sent (target is the raw request target)", function()
    local u = parses("http://h/a%20b/%2F?x=%26&y=a+b")
    assert.equal("/a%20b/%2F", u.path)
    assert.equal("x=%26&y=a+b", u.query)
    assert.equal("/a%20b/%2F?x=%26&y=a+b", u.target)
  end)

  it("ports: explicit, 1 and 65535 accepted; 0, 65536, non-digits and signs rejected", function()
    assert.equal(8080, parses("http://h:8080/").port)
    assert.equal("integer", math.type(parses("http://h:8080/").port))
    assert.equal(1, parses("http://h:1/").port)
    assert.equal(65535, parses("http://h:65535/").port)
    assert.equal("h:65535", parses("http://h:65535/").authority)
    rejects("http://h:0/")
    rejects("http://h:65536/")
    rejects("http://h:99999999999999999999/")
    rejects("http://h:abc/")
    rejects("http://h:-1/")
    rejects("http://h:+80/")
    rejects("http://h:80x/")
  end)

  it("an empty port means the scheme's default", function()
    local u = parses("http://h:/p")
    assert.equal(80, u.port)
    assert.equal("h", u.host)
  end)

  it("the scheme's default port given explicitly: port 80, Host without or with :80", function()
    local u = parses("http://h:80/p")
    assert.equal(80, u.port)
    assert.is_true(u.authority == "h" or u.authority == "h:80", u.authority)
  end)

  it("IPv6 literals in brackets: host without brackets, authority with them", function()
    assert.same({ scheme = "http", host = "::1", port = 8080, path = "/p", target = "/p",
                  authority = "[::1]:8080" }, parses("http://[::1]:8080/p"))
    local u = parses("http://[2001:DB8::a:1]/x?y")
    assert.equal("2001:db8::a:1", u.host)
    assert.equal(80, u.port)
    assert.equal("[2001:db8::a:1]", u.authority)
    assert.equal("/x?y", u.target)
    u = parses("http://[::ffff:127.0.0.1]:81")
    assert.equal("::ffff:127.0.0.1", u.host)
    assert.equal(81, u.port)
    assert.equal("[::ffff:127.0.0.1]:81", u.authority)
    assert.is_true(url.parse("http://[::1]/").ipv6)
  end)

  it("rejects malformed IPv6 literals", function()
    rejects("http://[::1/")
    rejects("http://[::1]x/")
    rejects("http://[::1]:abc/")
    rejects("http://[zz::1]/")
    rejects("http://[]/")
  end)

  -- Regression: any run of hex digits, ':' and '.' in brackets passed for an IPv6 literal:
  -- "[127.1]" and "[1]" parsed (ipv6 = true) and the client then connected to them as the
  -- IPv4 addresses 127.0.0.1 and 0.0.0.1. Only RFC 4291 text forms are taken now (what
  -- inet_pton(AF_INET6) takes), so a bracketed host is always an IPv6 address.
  it("a bracketed host must be an IPv6 address in RFC 4291 text form (as inet_pton takes it)", function()
    for _, h in ipairs { "::", "::1", "1::", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8",
                         "fe80::1:2", "0:0:0:0:0:0:0:0", "::ffff:1.2.3.4", "::1.2.3.4",
                         "1:2:3:4:5:6:255.255.255.255", "64:ff9b::192.0.2.33" } do
      local u = assert(url.parse("http://[" .. h .. "]:8/"), h)
      assert.same({ h, true, "[" .. h .. "]:8" }, { u.host, u.ipv6, u.authority })
    end
    for _, h in ipairs { "127.1", "1", "...", ":", ":::", "127.0.0.1", "1:::2", "1::2::3", ":1::", "1:",
                         "1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "1::2:3:4:5:6:7:8", "12345::", "::g",
                         "::1.2.3", "::1.2.3.256", "::01.2.3.4", "::1.2.3.4.5", "1.2.3.4::", "::1.2.3.4:5",
                         "1:2:3:4:5:6:7:1.2.3.4", "1::." } do
      assert.matches("invalid IPv6 literal", rejects("http://[" .. h .. "]/"), 1, true)
    end
  end)

  it("userinfo: user and password percent-decoded; a password may hold ':'; user alone", function()
    local u = parses("http://us%20er:p%40ss%3Aword@h/")
    assert.equal("us er", u.user)
    assert.equal("p@ss:word", u.password)
    assert.equal("h", u.host)
    assert.equal("h", u.authority)
    u = parses("http://a:b:c@h/")
    assert.equal("a", u.user)
    assert.equal("b:c", u.password)
    u = parses("http://bob@h:81/")
    assert.equal("bob", u.user)
    assert.is_nil(u.password)
    assert.equal("h:81", u.authority)
    u = parses("http://bob:@h/")
    assert.equal("bob", u.user)
    assert.equal("", u.password)
  end)

  -- messages end up in logs: url.redact hides passwords, and url.parse's errors use it
  it("redact hides a userinfo's password and password= values; parse errors show no password", function()
    assert.equal("http://u:***@h/p", url.redact("http://u:s3cret@h/p"))
    assert.equal("http://u:***@h/", url.redact("http://u:a:b@c@h/"))
    assert.equal("http://bob@h/", url.redact("http://bob@h/"))
    assert.equal("x://h/?a=1&password=***#f", url.redact("x://h/?a=1&password=s3cret#f"))
    assert.equal("http://h/", url.redact("http://h/"))
    for _, s in ipairs { "http://u:s3cret@h:99999/", "http://u:s3cret@[1::2::3]/", "http://u:s3cret@/",
                         "http://u:s3 cret@h/", "http://u:s3cret@h\\x/" } do
      local err = rejects(s)
      assert.is_nil(err:find("s3", 1, true), err)
      assert.matches("u:***@", err, 1, true)
    end
  end)

  it("userinfo never leaks into authority or target", function()
    local u = parses("http://u:p@[::1]:9/t?q")
    assert.equal("[::1]:9", u.authority)
    assert.equal("/t?q", u.target)
    assert.equal("::1", u.host)
  end)

  it("rejects strings that are not absolute URLs", function()
    rejects("")
    rejects("example.com/path")
    rejects("/just/a/path")
    rejects("http:/one-slash")
    rejects("http://")
    rejects("http:///path")
    rejects("http://:80/")
    rejects("http://user@/")
    rejects("http://exa mple.com/")
    rejects("http://example.com/a b")
    rejects("http://example.com/\r\nX: y")
    rejects("http://example.com/\0")
    rejects("http://example.com/\1")
    rejects("http://example.com/a\127")
    rejects("1http://h/")
    -- a browser (WHATWG URL) reads "\" as "/": host 127.0.0.1 to it, evil.example to RFC 3986
    rejects("http://127.0.0.1:8080\\@evil.example/")
    rejects("http://a\\b/")
  end)

  it("raises on a non-string argument", function()
    assert.has_error(function() url.parse(nil) end)
    assert.has_error(function() url.parse(42) end)
  end)
end)

-- RFC 3986 section 5.4.
local BASE = "http://a/b/c/d;p?q"

local function resolves(cases)
  for _, c in ipairs(cases) do
    assert.equal(c[2], url.resolve(BASE, c[1]), ("resolve(%q, %q)"):format(BASE, c[1]))
  end
end

describe("url.resolve", function()
  it("RFC 3986 5.4.1 normal examples (without fragments)", function()
    resolves {
      { "g", "http://a/b/c/g" },
      { "./g", "http://a/b/c/g" },
      { "g/", "http://a/b/c/g/" },
      { "/g", "http://a/g" },
      { "//g", "http://g" },
      { "?y", "http://a/b/c/d;p?y" },
      { "g?y", "http://a/b/c/g?y" },
      { ";x", "http://a/b/c/;x" },
      { "g;x", "http://a/b/c/g;x" },
      { "", "http://a/b/c/d;p?q" },
      { ".", "http://a/b/c/" },
      { "./", "http://a/b/c/" },
      { "..", "http://a/b/" },
      { "../", "http://a/b/" },
      { "../g", "http://a/b/g" },
      { "../..", "http://a/" },
      { "../../", "http://a/" },
      { "../../g", "http://a/g" },
    }
  end)

  it("RFC 3986 5.4.2 abnormal examples: '..' above the root, dot-like names, dots inside", function()
    resolves {
      { "../../../g", "http://a/g" },
      { "../../../../g", "http://a/g" },
      { "g.", "http://a/b/c/g." },
      { ".g", "http://a/b/c/.g" },
      { "g..", "http://a/b/c/g.." },
      { "..g", "http://a/b/c/..g" },
      { "./../g", "http://a/b/g" },
      { "./g/.", "http://a/b/c/g/" },
      { "g/./h", "http://a/b/c/g/h" },
      { "g/../h", "http://a/b/c/h" },
      { "g;x=1/./y", "http://a/b/c/g;x=1/y" },
      { "g;x=1/../y", "http://a/b/c/y" },
      { "g?y/./x", "http://a/b/c/g?y/./x" },
      { "g?y/../x", "http://a/b/c/g?y/../x" },
    }
  end)

  it("RFC 3986 5.4.2: dot segments in an absolute-path reference are removed", function()
    resolves {
      { "/./g", "http://a/g" },
      { "/../g", "http://a/g" },
      { "/a/./b/../c", "http://a/a/c" },
    }
  end)

  it("RFC 3986 5.4.1: fragments of the reference are kept", function()
    resolves {
      { "#s", "http://a/b/c/d;p?q#s" },
      { "g#s", "http://a/b/c/g#s" },
      { "g?y#s", "http://a/b/c/g?y#s" },
      { "g;x?y#s", "http://a/b/c/g;x?y#s" },
      { "g#s/./x", "http://a/b/c/g#s/./x" },
      { "g#s/../x", "http://a/b/c/g#s/../x" },
    }
  end)

  it("RFC 3986 5.4.1: a reference with another scheme is taken as it is ('g:h')", function()
    assert.equal("g:h", url.resolve(BASE, "g:h"))
  end)

  it("an absolute URL is taken as it is; a scheme-relative one keeps the base's scheme", function()
    assert.equal("http://other:81/x?y", url.resolve("http://h/a/b", "http://other:81/x?y"))
    assert.equal("http://other:81/x", url.resolve("http://h/a/b", "//other:81/x"))
  end)

  it("keeps the base's port (and IPv6 brackets) for relative references", function()
    assert.equal("http://127.0.0.1:8080/x", url.resolve("http://127.0.0.1:8080/a/b", "/x"))
    assert.equal("http://127.0.0.1:8080/a/x", url.resolve("http://127.0.0.1:8080/a/b", "x"))
    assert.equal("http://127.0.0.1:8080/a/b?n=2", url.resolve("http://127.0.0.1:8080/a/b?n=1", "?n=2"))
    assert.equal("http://[::1]:8080/x", url.resolve("http://[::1]:8080/a/b", "/x"))
    assert.equal("http://[::1]:8080/a/y", url.resolve("http://[::1]:8080/a/b", "y"))
  end)

  it("a base whose path is empty or '/' resolves relative names under '/'", function()
    assert.equal("http://h/x", url.resolve("http://h", "x"))
    assert.equal("http://h/x", url.resolve("http://h/", "x"))
    assert.equal("http://h/", url.resolve("http://h/", ".."))
  end)
end)

describe("url.encode / url.decode", function()
  it("encode leaves RFC 3986 unreserved characters alone and encodes the rest as %XX (upper case)", function()
    assert.equal("AZaz09-._~", url.encode("AZaz09-._~"))
    assert.equal("a%20b%26c%3Dd%2Fe%3Ff%23g%2Bh%25i", url.encode("a b&c=d/e?f#g+h%i"))
    assert.equal("%00%0D%0A%FF", url.encode("\0\r\n\255"))
    assert.equal("%C3%A9", url.encode("é"))
    assert.equal("", url.encode(""))
  end)

  it("decode: %XX in either case; '+' stays '+' unless form decoding is asked", function()
    assert.equal("a b+c", url.decode("a%20b+c"))
    assert.equal("a b c", url.decode("a%20b+c", true))
    assert.equal("JJ", url.decode("%4a%4A"))
    assert.equal("é/", url.decode("%C3%A9%2f"))
    assert.equal("\0", url.decode("%00"))
  end)

  it("decode leaves invalid or truncated escapes as they are", function()
    assert.equal("%zz", url.decode("%zz"))
    assert.equal("100%", url.decode("100%"))
    assert.equal("%4", url.decode("%4"))
    assert.equal("%%41", url.decode("%%2541"))
  end)

  it("decode(encode(s)) == s for every byte value", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    local s = table.concat(all)
    assert.equal(s, url.decode(url.encode(s)))
    assert.equal(s, url.decode(url.encode(s), true))
  end)
end)

describe("url.build_query / url.parse_query", function()
  it("build_query: the documented example", function()
    assert.equal("a=1&b=x&b=y", url.build_query { a = 1, b = { "x", "y" } })
  end)

  it("build_query sorts the keys (stable output) and encodes keys and values", function()
    assert.equal("a=1&m=2&z=3", url.build_query { z = 3, a = 1, m = 2 })
    local q = url.build_query { ["a b"] = "c&d=e", ["k#"] = "+%" }
    assert.is_nil(q:find("[ #+]"), q)
    -- a space may be written as %20 or +; either way it decodes back
    assert.is_true(q == "a%20b=c%26d%3De&k%23=%2B%25" or q == "a+b=c%26d%3De&k%23=%2B%25", q)
    assert.same({ ["a b"] = "c&d=e", ["k#"] = "+%" }, url.parse_query(q))
  end)

  it("build_query of an empty table is ''", function()
    assert.equal("", url.build_query {})
  end)

  it("build_query raises on a non-table", function()
    assert.has_error(function() url.build_query("a=1") end)
  end)

  it("parse_query: repeated keys give arrays in order, single keys strings", function()
    assert.same({ a = "1", b = { "x", "y", "z" } }, url.parse_query("a=1&b=x&b=y&b=z"))
  end)

  it("parse_query decodes %XX and '+' in keys and values", function()
    assert.same({ ["a b"] = "c d", ["x&y"] = "=&é" }, url.parse_query("a+b=c%20d&x%26y=%3D%26%C3%A9"))
  end)

  it("parse_query: a key without '=' or with an empty value maps to ''", function()
    assert.same({ flag = "", empty = "" }, url.parse_query("flag&empty="))
  end)

  it("parse_query: only the first '=' separates; empty pieces are skipped", function()
    assert.same({ a = "b=c", d = "1" }, url.parse_query("a=b=c&&d=1&"))
    assert.same({}, url.parse_query(""))
  end)

  it("build_query refuses a value it cannot write (a nested table, a function)", function()
    local ok, err = pcall(url.build_query, { a = { {} } })
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'build_query' (value of 'a' is a table", err, 1, true)
    ok, err = pcall(url.build_query, { f = print })
    assert.is_false(ok)
    assert.matches("value of 'f' is a function", err, 1, true)
    assert.equal("a=1&b&n=2.5", url.build_query { a = 1, b = true, c = false, n = 2.5 })
  end)

  it("build_query and parse_query round-trip", function()
    local t = { name = "Jürgen & Co", list = { "1", "two words", "a=b" }, plus = "1+1" }
    assert.same(t, url.parse_query(url.build_query(t)))
  end)
end)
