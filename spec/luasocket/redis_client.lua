-- A real pure-Lua LuaSocket driver, nrk's redis-lua (Debian's lua-redis, packaged for Lua
-- 5.1-5.3; the file itself runs on 5.4), run unchanged: with Debian's LuaSocket in a plain
-- lua5.4, and under mw.run with moonwire.socket installed. The transcripts must match.
package.path = package.path .. ";/usr/share/lua/5.3/?.lua"
local redis = require "redis"
local port = tonumber(arg[1])

local c = redis.connect("127.0.0.1", port)
print("ping", c:ping())
print("flushdb", c:flushdb())
print("set", c:set("k", "v"))
print("get", c:get("k"))
print("get missing", c:get("missing"))
local big = ("0123456789abcdef"):rep(20000)
c:set("big", big)
print("big", c:get("big") == big)
print("incr", c:incr("n"), c:incrby("n", 41))
print("rpush", c:rpush("l", "a", "b", "c\r\nd"))
print("lrange", table.concat(c:lrange("l", 0, -1), "|"))
print("hset", c:hset("h", "f", "1"), c:hget("h", "f"))
print("wrong type", pcall(c.incr, c, "l"))
-- (its pipeline() and transaction() use a table.insert that Lua 5.4 rejects)
print("lpop", c:lpop("l"), c:llen("l"))
print("mset/mget", c:mset("a", "1", "b", "2"), table.concat(c:mget("a", "b", "c"), ","))
print("exists", c:exists("a"), c:del("a", "b"), c:exists("a"))
print("blpop timeout", c:blpop("empty", 1))
print("quit", c:quit())
