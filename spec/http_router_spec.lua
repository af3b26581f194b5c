-- Router (docs/http.md "Router"): literal/:param/*splat patterns and their precedence, params,
-- strict trailing slashes, 404, 405 with Allow, HEAD through GET, "*" routes, Koa-style
-- middleware (order, early stop, double next), mounts (stripped path, base, fall-through,
-- restore), static directories through the router, argument errors. Fake request/response
-- objects: no sockets, no loop.
local router = require "moonwire.http.router"
local helper = require "spec.helper"

local raises = helper.raises

local function request(method, path, fields)
  local req = { method = method, path = path, target = path, headers = {} }
  for k, v in pairs(fields or {}) do req[k] = v end
  return req
end

-- A response recorder: what the handler did, nothing sent anywhere.
local function response()
  local res = { code = 200, headers = {}, sends = 0 }
  function res.status(self, n) self.code = n end
  function res.header(self, k, v) self.headers[k:lower()] = v end
  function res.send(self, body)
    self.body, self.sends = body or "", self.sends + 1
  end
  function res.sendfile(self, path, offset, length)
    self.file, self.sends = { path, offset, length }, self.sends + 1
  end
  function res.redirect(self, url, code)
    self.code, self.headers.location, self.sends = code or 302, url, self.sends + 1
  end
  return res
end

local function call(app, method, path, fields)
  local req, res = request(method, path, fields), response()
  app(req, res)
  return res, req
end

-- a handler answering with its name
local function answer(name)
  return function(_, res) res:send(name) end
end

local function echo_params(req, res)
  local keys = {}
  for k, v in pairs(req.params) do keys[#keys + 1] = k .. "=" .. v end
  table.sort(keys)
  res:send(table.concat(keys, "&"))
end

describe("http.router", function()
  describe("matching", function()
    it("answers literal routes, including the root", function()
      local app = router.new()
      app:get("/", answer "root")
      app:get("/a/b", answer "ab")
      app:get("/a", answer "a")
      assert.equal("root", call(app, "GET", "/").body)
      assert.equal("ab", call(app, "GET", "/a/b").body)
      assert.equal("a", call(app, "GET", "/a").body)
      assert.equal(404, call(app, "GET", "/a/b/c").code)
      assert.equal(404, call(app, "GET", "/b").code)
    end)

    it("binds :name segments into req.params", function()
      local app = router.new()
      app:get("/users/:id", echo_params)
      app:get("/a/:x/b/:y", echo_params)
      assert.equal("id=42", call(app, "GET", "/users/42").body)
      assert.equal("x=1&y=two words", call(app, "GET", "/a/1/b/two words").body)
    end)

    it("never binds :name to an empty segment", function()
      local app = router.new()
      app:get("/users/:id", echo_params)
      assert.equal(404, call(app, "GET", "/users/").code)
      assert.equal(404, call(app, "GET", "/users").code)
    end)

    it("binds *splat to the rest of the path, slashes included, possibly empty", function()
      local app = router.new()
      app:get("/files/*path", echo_params)
      app:get("/u/:user/*rest", echo_params)
      assert.equal("path=a/b/c.txt", call(app, "GET", "/files/a/b/c.txt").body)
      assert.equal("path=", call(app, "GET", "/files/").body)
      assert.equal("path=a//b/", call(app, "GET", "/files/a//b/").body)
      assert.equal("rest=x/y&user=bob", call(app, "GET", "/u/bob/x/y").body)
      -- the splat follows a "/": "/files" itself is another path (strict, like trailing slashes)
      assert.equal(404, call(app, "GET", "/files").code)
    end)

    it("matches a root splat against every path", function()
      local app = router.new()
      app:get("/*all", echo_params)
      assert.equal("all=", call(app, "GET", "/").body)
      assert.equal("all=x/y", call(app, "GET", "/x/y").body)
    end)

    it("prefers literal over :param over *splat at each segment, whatever the order", function()
      local app = router.new()
      app:get("/users/*rest", answer "splat")
      app:get("/users/:id", answer "param")
      app:get("/users/me", answer "literal")
      assert.equal("literal", call(app, "GET", "/users/me").body)
      assert.equal("param", call(app, "GET", "/users/42").body)
      assert.equal("splat", call(app, "GET", "/users/42/posts").body)
      local app2 = router.new()
      app2:get("/users/me", answer "literal")
      app2:get("/users/:id", answer "param")
      app2:get("/users/*rest", answer "splat")
      assert.equal("literal", call(app2, "GET", "/users/me").body)
      assert.equal("param", call(app2, "GET", "/users/42").body)
    end)

    it("backtracks from a literal branch that has no deeper match", function()
      local app = router.new()
      app:get("/users/me/profile", answer "profile")
      app:get("/users/:id/settings", echo_params)
      app:get("/*any", answer "any")
      assert.equal("profile", call(app, "GET", "/users/me/profile").body)
      assert.equal("id=me", call(app, "GET", "/users/me/settings").body)
      assert.equal("any", call(app, "GET", "/users/me/other").body)
    end)

    it("falls back to a less specific route that has the method", function()
      local app = router.new()
      app:post("/users/me", answer "me")
      app:get("/users/:id", echo_params)
      assert.equal("id=me", call(app, "GET", "/users/me").body)
      assert.equal("me", call(app, "POST", "/users/me").body)
    end)

    it("leaves only the winning route's params (none from abandoned branches)", function()
      local app = router.new()
      app:get("/a/:x/deep", echo_params)
      app:get("/a/*rest", echo_params)
      local res, req = call(app, "GET", "/a/1/other")
      assert.equal("rest=1/other", res.body)
      assert.is_nil(req.params.x)
    end)

    it("creates req.params, or adds to an existing table", function()
      local app = router.new()
      app:get("/plain", answer "p")
      app:get("/p/:id", answer "p")
      local _, req = call(app, "GET", "/plain")
      assert.same({}, req.params)
      local mine = { from = "server" }
      _, req = call(app, "GET", "/p/7", { params = mine })
      assert.equal(mine, req.params)
      assert.same({ from = "server", id = "7" }, mine)
    end)

    it("lets routes of one shape name their parameters differently per method", function()
      local app = router.new()
      app:get("/u/:id", echo_params)
      app:delete("/u/:uid", echo_params)
      assert.equal("id=5", call(app, "GET", "/u/5").body)
      assert.equal("uid=5", call(app, "DELETE", "/u/5").body)
    end)

    it("treats a trailing slash as part of the path (strict)", function()
      local app = router.new()
      app:get("/a", answer "a")
      app:get("/b/", answer "b/")
      app:get("/c/:id", answer "c")
      assert.equal(404, call(app, "GET", "/a/").code)
      assert.equal(404, call(app, "GET", "/b").code)
      assert.equal("b/", call(app, "GET", "/b/").body)
      assert.equal(404, call(app, "GET", "/c/1/").code)
    end)

    it("does not match paths that do not start with '/'", function()
      local app = router.new()
      app:get("/*all", answer "all")
      assert.equal(404, call(app, "OPTIONS", "*").code)
      assert.equal(404, call(app, "GET", "").code)
    end)

    it("compares segments literally (patterns and paths are decoded text)", function()
      local app = router.new()
      app:get("/a b/:c", echo_params)
      assert.equal("c=ü%", call(app, "GET", "/a b/ü%").body)
    end)
  end)

  describe("methods", function()
    it("registers get/post/put/patch/delete/options/head", function()
      local app = router.new()
      for _, m in ipairs { "get", "post", "put", "patch", "delete", "options", "head" } do
        app[m](app, "/x", answer(m))
      end
      for _, m in ipairs { "get", "post", "put", "patch", "delete", "options", "head" } do
        assert.equal(m, call(app, m:upper(), "/x").body)
      end
    end)

    it("answers 404 Not Found as text/plain for an unknown path", function()
      local res = call(router.new(), "GET", "/nothing")
      assert.equal(404, res.code)
      assert.equal("text/plain; charset=utf-8", res.headers["content-type"])
      assert.equal("Not Found\n", res.body)
      assert.equal(1, res.sends)
    end)

    it("answers 405 with a sorted Allow (HEAD with GET, OPTIONS when defined)", function()
      local app = router.new()
      app:post("/x", answer "post")
      app:get("/x", answer "get")
      app:options("/x", answer "options")
      local res = call(app, "DELETE", "/x")
      assert.equal(405, res.code)
      assert.equal("GET, HEAD, OPTIONS, POST", res.headers.allow)
      assert.equal("text/plain; charset=utf-8", res.headers["content-type"])
      assert.equal("Method Not Allowed\n", res.body)
      res = call(app, "GET", "/y")
      assert.equal(404, res.code)
      assert.is_nil(res.headers.allow)
    end)

    it("lists in Allow the methods of every route matching the path", function()
      local app = router.new()
      app:post("/u/me", answer "me")
      app:put("/u/:id", answer "id")
      app:patch("/u/*rest", answer "rest")
      assert.equal("PATCH, POST, PUT", call(app, "GET", "/u/me").headers.allow)
      assert.equal("PATCH, PUT", call(app, "GET", "/u/7").headers.allow)
      assert.equal("PATCH", call(app, "GET", "/u/7/x").headers.allow)
    end)

    it("serves HEAD with GET routes; an explicit HEAD route wins", function()
      local app = router.new()
      app:get("/g", answer "get")
      app:get("/h", answer "get")
      app:head("/h", answer "head")
      assert.equal("get", call(app, "HEAD", "/g").body)
      assert.equal("head", call(app, "HEAD", "/h").body)
      local res = call(app, "HEAD", "/nothing")
      assert.equal(404, res.code)
    end)

    it("matches any method with route('*'); a specific method wins", function()
      local app = router.new()
      app:route("*", "/any", answer "any")
      app:route("GET", "/any", answer "get")
      app:route("PURGE", "/cache", answer "purge")
      assert.equal("get", call(app, "GET", "/any").body)
      assert.equal("get", call(app, "HEAD", "/any").body)
      assert.equal("any", call(app, "BREW", "/any").body)
      assert.equal("purge", call(app, "PURGE", "/cache").body)
      assert.equal("PURGE", call(app, "GET", "/cache").headers.allow)
    end)

    it("is callable, and handle() does the same", function()
      local app = router.new()
      app:get("/x", answer "x")
      local req, res = request("GET", "/x"), response()
      app:handle(req, res)
      assert.equal("x", res.body)
    end)

    it("returns the router from registration calls (chaining)", function()
      local app = router.new()
      assert.equal(app, app:get("/a", answer "a"):post("/b", answer "b"):use(function(_, _, n) n() end))
      assert.equal("b", call(app, "POST", "/b").body)
    end)

    it("calls the caller's next instead of answering 404 (mounted routers fall through)", function()
      local app = router.new()
      app:get("/x", answer "x")
      local res, ran = response(), 0
      app:handle(request("GET", "/y"), res, function() ran = ran + 1 end)
      assert.equal(1, ran)
      assert.equal(0, res.sends)
    end)
  end)

  describe("middleware", function()
    it("runs in order around the route, Koa style (next returns after the rest ran)", function()
      local app, log = router.new(), {}
      app:get("/x", function(_, res)
        log[#log + 1] = "route"
        res:send("x")
      end)
      app:use(function(_, _, nxt)
        log[#log + 1] = "a>"
        nxt()
        log[#log + 1] = "<a"
      end)
      app:use(function(_, _, nxt)
        log[#log + 1] = "b>"
        nxt()
        log[#log + 1] = "<b"
      end)
      assert.equal("x", call(app, "GET", "/x").body)
      assert.same({ "a>", "b>", "route", "<b", "<a" }, log)
    end)

    it("ends the chain when a middleware does not call next", function()
      local app, ran = router.new(), {}
      app:use(function(_, res) ran.a = true; res:status(401); res:send("no") end)
      app:use(function(_, _, nxt) ran.b = true; nxt() end)
      app:get("/x", function() ran.route = true end)
      local res = call(app, "GET", "/x")
      assert.equal(401, res.code)
      assert.equal("no", res.body)
      assert.same({ a = true }, ran)
    end)

    it("runs for unknown paths too, before the 404", function()
      local app, seen = router.new(), nil
      app:use(function(req, res, nxt)
        seen = req.path
        nxt()
        res.after = true
      end)
      local res = call(app, "GET", "/nothing")
      assert.equal("/nothing", seen)
      assert.equal(404, res.code)
      assert.is_true(res.after)
    end)

    it("may rewrite req.path before routing", function()
      local app = router.new()
      app:use(function(req, _, nxt)
        req.path = req.path:lower()
        nxt()
      end)
      app:get("/abc", answer "abc")
      assert.equal("abc", call(app, "GET", "/ABC").body)
    end)

    it("raises when next is called twice", function()
      local app, routed = router.new(), 0
      app:use(function(_, _, nxt)
        nxt()
        nxt()
      end)
      app:get("/x", function(_, res)
        routed = routed + 1
        res:send("x")
      end)
      raises("next() called more than once", call, app, "GET", "/x")
      assert.equal(1, routed)
    end)

    it("raises when a middleware calls next after a later one ended the chain", function()
      local app, routed = router.new(), false
      app:use(function(_, _, nxt)
        nxt()
        nxt()
      end)
      app:use(function(_, res) res:send("stop") end)
      app:get("/x", function() routed = true end)
      raises("next() called more than once", call, app, "GET", "/x")
      assert.is_false(routed)
    end)

    -- Review: next() was marked used only when it returned, so after a raise it could be
    -- called again, and a middleware that caught the error (pcall(next)) and called next()
    -- once more ran the route a second time (docs/http.md: calling it twice raises).
    it("raises when next is called again after it raised, also through a later middleware", function()
      for _, depth in ipairs { 1, 2 } do
        local app, routed, second = router.new(), 0, nil
        app:use(function(_, _, nxt)
          local ok, err = pcall(nxt)
          assert.is_false(ok)
          assert.matches("first", err)
          second = select(2, pcall(nxt))
        end)
        if depth == 2 then app:use(function(_, _, nxt) nxt() end) end
        app:get("/x", function()
          routed = routed + 1
          error("first")
        end)
        call(app, "GET", "/x")
        assert.equal(1, routed, "depth " .. depth)
        assert.matches("next%(%) called more than once", second)
      end
    end)

    it("accepts callable tables as middleware and handlers", function()
      local app = router.new()
      local mw = setmetatable({}, { __call = function(_, req, _, nxt) req.tag = "t"; nxt() end })
      local h = setmetatable({}, { __call = function(_, req, res) res:send(req.tag) end })
      app:use(mw)
      app:get("/x", h)
      assert.equal("t", call(app, "GET", "/x").body)
    end)
  end)

  describe("mount", function()
    it("hands the sub-router the path without the prefix, and req.base", function()
      local app, api = router.new(), router.new()
      local seen
      api:get("/users/:id", function(req, res)
        seen = { path = req.path, base = req.base }
        echo_params(req, res)
      end)
      app:mount("/api", api)
      local res, req = call(app, "GET", "/api/users/3")
      assert.equal("id=3", res.body)
      assert.same({ path = "/users/3", base = "/api" }, seen)
      assert.equal("/api/users/3", req.path)
      assert.is_nil(req.base)
    end)

    it("maps the prefix itself (with or without slash) to '/', not a longer name", function()
      local app, sub = router.new(), router.new()
      sub:get("/", function(req, res) res:send("root of " .. req.base) end)
      app:mount("/api/", sub) -- trailing slash of a prefix is ignored
      assert.equal("root of /api", call(app, "GET", "/api").body)
      assert.equal("root of /api", call(app, "GET", "/api/").body)
      assert.equal(404, call(app, "GET", "/apix").code)
    end)

    it("concatenates req.base through nested mounts", function()
      local app, v1, users = router.new(), router.new(), router.new()
      users:get("/:id", function(req, res) res:send(req.base .. " " .. req.path .. " " .. req.params.id) end)
      v1:mount("/users", users)
      app:mount("/v1", v1)
      assert.equal("/v1/users /9 9", call(app, "GET", "/v1/users/9").body)
    end)

    it("prefers the parent's own routes, then mounts and static in registration order", function()
      local app, a, b = router.new(), router.new(), router.new()
      a:get("/x", answer "a")
      b:get("/x", answer "b")
      b:get("/y", answer "b")
      app:mount("/m", a)
      app:mount("/m", b)
      app:get("/m/x", answer "parent")
      assert.equal("parent", call(app, "GET", "/m/x").body)
      assert.equal("b", call(app, "GET", "/m/y").body)
    end)

    it("falls through to the parent when the sub-router has nothing, with the path restored", function()
      local app, sub = router.new(), router.new()
      sub:get("/known", answer "sub")
      local seen = {}
      sub:use(function(req, _, nxt)
        seen[#seen + 1] = "sub sees " .. req.path
        nxt()
        seen[#seen + 1] = "sub after " .. req.path
      end)
      app:mount("/s", sub)
      app:mount("/", function(req, res)
        seen[#seen + 1] = "next sees " .. req.path .. " base " .. tostring(req.base)
        res:send("fallback")
      end)
      local res, req = call(app, "GET", "/s/unknown")
      assert.equal("fallback", res.body)
      assert.same({ "sub sees /unknown", "next sees /s/unknown base ", "sub after /unknown" }, seen)
      assert.equal("/s/unknown", req.path)
      assert.equal(404, call(router.new():mount("/s", sub), "GET", "/s/unknown").code)
    end)

    it("answers 405 for a path the sub-router knows with another method", function()
      local app, sub = router.new(), router.new()
      sub:post("/items", answer "post")
      app:mount("/api", sub)
      local res = call(app, "GET", "/api/items")
      assert.equal(405, res.code)
      assert.equal("POST", res.headers.allow)
    end)

    it("runs the parent's middleware before the sub-router's", function()
      local app, sub, log = router.new(), router.new(), {}
      app:use(function(req, _, nxt) log[#log + 1] = "parent " .. req.path; nxt() end)
      sub:use(function(req, _, nxt) log[#log + 1] = "sub " .. req.path; nxt() end)
      sub:get("/x", answer "x")
      app:mount("/s", sub)
      assert.equal("x", call(app, "GET", "/s/x").body)
      assert.same({ "parent /s/x", "sub /x" }, log)
    end)

    it("restores req.path and req.base when the sub-router raises", function()
      local app, sub = router.new(), router.new()
      sub:get("/boom", function() error("boom") end)
      app:mount("/s", sub)
      local req = request("GET", "/s/boom", { base = "/outer" })
      raises("boom", app, req, response())
      assert.equal("/s/boom", req.path)
      assert.equal("/outer", req.base)
    end)

    it("binds params of the sub-router's routes", function()
      local app, sub = router.new(), router.new()
      sub:get("/:a/*b", echo_params)
      app:mount("/s", sub)
      assert.equal("a=1&b=2/3", call(app, "GET", "/s/1/2/3").body)
    end)
  end)

  describe("static", function()
    -- a temporary directory holding docs/a.txt; removed when the test ends
    local function tree()
      local dir = os.tmpname()
      os.remove(dir)
      dir = dir .. ".d"
      assert(os.execute(("mkdir -p '%s/docs'"):format(dir)))
      finally(function() os.execute(("rm -rf '%s'"):format(dir)) end)
      local f = assert(io.open(dir .. "/docs/a.txt", "w"))
      f:write("A")
      f:close()
      return dir, require("moonwire.core").realpath(dir)
    end

    it("serves files under the prefix; misses fall through to 405/404", function()
      local dir, real = tree()
      local app = router.new()
      app:static("/s", dir)
      app:post("/s/form", answer "posted")
      local res = call(app, "GET", "/s/docs/a.txt")
      assert.same({ real .. "/docs/a.txt", 0, 1 }, res.file)
      assert.equal("text/plain; charset=utf-8", res.headers["content-type"])
      assert.equal(404, call(app, "GET", "/s/missing").code)
      assert.equal(404, call(app, "POST", "/s/docs/missing.txt").code)
      res = call(app, "GET", "/s/form")
      assert.equal(405, res.code)
      assert.equal("POST", res.headers.allow)
      assert.equal(404, call(app, "GET", "/other/docs/a.txt").code)
    end)

    -- Review: another method on a file that exists got 404 (static called next, and the
    -- router's 405 knew only routes), and a route of another method on the file's path gave
    -- an Allow without GET and HEAD. RFC 9110 §15.5.6: 405, and Allow lists what works.
    it("answers 405 with GET, HEAD in Allow for a file asked for with another method", function()
      local dir = tree()
      local app = router.new()
      app:static("/", dir)
      local res = call(app, "POST", "/docs/a.txt")
      assert.equal(405, res.code)
      assert.equal("GET, HEAD", res.headers.allow)
      assert.equal("Method Not Allowed\n", res.body)
      assert.equal(404, call(app, "POST", "/docs/b.txt").code)      -- no such file
      -- merged with the methods of the routes on that path
      app:post("/docs/a.txt", answer "posted")
      assert.equal("posted", call(app, "POST", "/docs/a.txt").body)
      res = call(app, "DELETE", "/docs/a.txt")
      assert.equal(405, res.code)
      assert.equal("GET, HEAD, POST", res.headers.allow)
      -- a later mount still gets the request, and the file's methods reach a mounted router's 405
      local app2, sub = router.new(), router.new()
      app2:static("/", dir)
      app2:mount("/", function(req, res2) res2:send("later " .. req.method) end)
      assert.equal("later PUT", call(app2, "PUT", "/docs/a.txt").body)
      local app3 = router.new()
      sub:static("/files", dir)
      app3:mount("/m", sub)
      res = call(app3, "PUT", "/m/files/docs/a.txt")
      assert.equal(405, res.code)
      assert.equal("GET, HEAD", res.headers.allow)
      assert.equal(404, call(app3, "PUT", "/m/files/docs/b.txt").code)
    end)

    it("lets routes win over files and later mounts answer what static misses", function()
      local dir = tree()
      local app = router.new()
      app:static("/", dir)
      app:mount("/", function(_, res) res:send("later") end)
      app:get("/docs/a.txt", answer "route")
      assert.equal("route", call(app, "GET", "/docs/a.txt").body)
      assert.equal("later", call(app, "GET", "/docs/b.txt").body)
    end)

    it("works inside a mounted router; redirects keep the full path", function()
      local dir, real = tree()
      local app, sub = router.new(), router.new()
      sub:static("/files", dir, { max_age = 60 })
      app:mount("/m", sub)
      local res = call(app, "GET", "/m/files/docs/a.txt")
      assert.same({ real .. "/docs/a.txt", 0, 1 }, res.file)
      assert.equal("public, max-age=60", res.headers["cache-control"])
      res = call(app, "GET", "/m/files/docs")
      assert.equal(301, res.code)
      assert.equal("/m/files/docs/", res.headers.location)
      -- a static root mounted at /d: "/d" is its directory without the slash (relative links
      -- in its index would resolve against "/")
      local app2, sub2 = router.new(), router.new()
      sub2:static("/", dir)
      app2:mount("/d", sub2)
      res = call(app2, "GET", "/d", { target = "/d?x=1" })
      assert.equal(301, res.code)
      assert.equal("/d/?x=1", res.headers.location)
      assert.same({ real .. "/docs/a.txt", 0, 1 }, call(app2, "GET", "/d/docs/a.txt").file)
      assert.equal(301, call(app2, "GET", "/d/docs").code)
    end)
  end)

  describe("arguments", function()
    local fn = function() end

    it("names the bad argument and the method, at the caller's line", function()
      local app = router.new()
      local msg = raises("bad argument #1 to 'get' (string expected, got number)", app.get, app, 1, fn)
      assert.is_nil(msg:find("router.lua", 1, true))
      local ok, err = pcall(function() app:get(1, fn) end)
      assert.is_false(ok)
      assert.matches("http_router_spec.lua:%d+: bad argument #1 to 'get'", err)
      raises("bad argument #2 to 'post' (function expected, got nil)", app.post, app, "/x")
      raises("bad argument #2 to 'put' (function expected, got string)", app.put, app, "/x", "f")
    end)

    it("requires patterns to start with '/'", function()
      local app = router.new()
      raises("bad argument #1 to 'get' (pattern must start with '/', got 'x')", app.get, app, "x", fn)
      raises("bad argument #1 to 'get' (pattern must start with '/', got '')", app.get, app, "", fn)
      raises("bad argument #2 to 'route' (pattern must start with '/'", app.route, app, "GET", "a", fn)
    end)

    it("rejects duplicate, empty and odd parameter names, and a splat before the end", function()
      local app = router.new()
      local ok, err = pcall(function() app:get("/a/:id/b/:id", fn) end)
      assert.is_false(ok)
      assert.matches("http_router_spec.lua:%d+: bad argument #1 to 'get' %(duplicate parameter 'id'", err)
      raises("duplicate parameter 'x'", app.get, app, "/:x/*x", fn)
      raises("bad parameter name '' in pattern '/a/:'", app.get, app, "/a/:", fn)
      raises("bad parameter name 'a-b'", app.get, app, "/:a-b", fn)
      raises("bad parameter name ''", app.get, app, "/files/*", fn)
      raises("bad argument #2 to 'route' (splat '*p' must be the last segment of '/*p/x')",
        app.route, app, "GET", "/*p/x", fn)
    end)

    it("rejects a route defined twice for one method and shape", function()
      local app = router.new()
      app:get("/u/:id", fn)
      app:post("/u/:id", fn)
      local ok, err = pcall(function() app:get("/u/:name", fn) end)
      assert.is_false(ok)
      assert.matches("http_router_spec.lua:%d+: route GET /u/:name is already defined", err)
    end)

    it("checks route's method, use's and mount's arguments, and self", function()
      local app = router.new()
      raises("bad argument #1 to 'route' (string expected, got nil)", app.route, app, nil, "/", fn)
      raises("bad argument #1 to 'route' (bad method 'G T')", app.route, app, "G T", "/", fn)
      -- (case-sensitive, and HTTP/1.1 parses upper-case methods only: it could never match)
      raises("bad argument #1 to 'route' (bad method 'get' (methods are case-sensitive: 'GET'?))",
        app.route, app, "get", "/", fn)
      raises("bad argument #3 to 'route' (function expected, got table)", app.route, app, "GET", "/", {})
      raises("bad argument #1 to 'use' (function expected, got nil)", app.use, app)
      raises("bad argument #1 to 'mount' (prefix must start with '/', got 'api')", app.mount, app, "api", app)
      raises("bad argument #2 to 'mount' (function expected, got number)", app.mount, app, "/api", 1)
      raises("calling 'get' on bad self (moonwire.Router expected, got string)", app.get, "x", "/", fn)
    end)

    it("checks static's arguments and options", function()
      local app = router.new()
      local ok, err = pcall(function() app:static(1, "/tmp") end)
      assert.is_false(ok)
      assert.matches("http_router_spec.lua:%d+: bad argument #1 to 'static' %(string expected, got number%)",
        err)
      raises("bad argument #1 to 'static' (prefix must start with '/'", app.static, app, "s", "/tmp")
      raises("bad argument #2 to 'static' (string expected, got nil)", app.static, app, "/s")
      raises("bad argument #3 to 'static' (unknown option 'maxage')",
        app.static, app, "/s", "/tmp", { maxage = 1 })
      raises("bad argument #3 to 'static' (option 'max_age': non-negative integer expected, got -1)",
        app.static, app, "/s", "/tmp", { max_age = -1 })
    end)
  end)
end)
