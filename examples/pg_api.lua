-- A small JSON API over one PostgreSQL table, on moonwire's router and pool.
-- PostgreSQL does the JSON both ways (json_agg / row_to_json out, json_populate_record in),
-- so the app needs no JSON library, and request bodies reach SQL only as $1 parameters.
--
--   PG_URL=postgresql://user:pw@127.0.0.1/db \
--   LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/?.so;;' lua5.4 examples/pg_api.lua [port]
--
--   GET /items            all items, by id        POST /items     {"name": "...", "qty": 1}
--   GET /items/:id        one item or 404         PUT /items/:id  {"qty": 2} (fields to change)
--   DELETE /items/:id     204 or 404
local http = require "moonwire.http"
local pg = require "moonwire.pg"

local M = {}

M.SCHEMA = [[
CREATE TABLE IF NOT EXISTS items (
  id serial PRIMARY KEY,
  name text NOT NULL CHECK (name <> ''),
  qty integer NOT NULL DEFAULT 0 CHECK (qty >= 0)
)]]

local function json(res, status, body)
  res:status(status):header("content-type", "application/json")
  res:send(body .. "\n")
end

local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c) return ("\\u%04x"):format(c:byte()) end) .. '"'
end

-- a failed query: client errors (bad JSON, a check) are 400, the rest 500
local function fail(res, err, code)
  local status = (code and (code:find("^22") or code:find("^23"))) and 400 or 500
  json(res, status, ('{"error":%s,"sqlstate":%s}'):format(quote(tostring(err)), quote(tostring(code))))
end

local function id_of(req)
  local id = tonumber(req.params.id)
  if not id or id ~= math.floor(id) or id < 1 or id > 2147483647 then return nil end
  return math.tointeger(id)
end

--- M.router(pool) -> an http router serving the API from the pool's database
function M.router(db)
  local app = http.router()

  app:get("/items", function(_, res)
    local rows, err, code = db:query(
      "SELECT coalesce(json_agg(i ORDER BY id), '[]')::text AS body FROM items i")
    if not rows then return fail(res, err, code) end
    json(res, 200, rows[1].body)
  end)

  app:get("/items/:id", function(req, res)
    local id = id_of(req)
    if not id then return json(res, 404, '{"error":"not found"}') end
    local rows, err, code = db:query("SELECT row_to_json(i)::text AS body FROM items i WHERE id = $1", id)
    if not rows then return fail(res, err, code) end
    if not rows[1] then return json(res, 404, '{"error":"not found"}') end
    json(res, 200, rows[1].body)
  end)

  app:post("/items", function(req, res)
    local body = req:body()
    if not body then return json(res, 400, '{"error":"no body"}') end
    local rows, err, code = db:query([[
      INSERT INTO items (name, qty)
      SELECT r.name, coalesce(r.qty, 0) FROM json_populate_record(NULL::items, $1::json) r
      RETURNING row_to_json(items)::text AS body]], body)
    if not rows then return fail(res, err, code) end
    json(res, 201, rows[1].body)
  end)

  app:put("/items/:id", function(req, res)
    local id = id_of(req)
    local body = req:body()
    if not id then return json(res, 404, '{"error":"not found"}') end
    if not body then return json(res, 400, '{"error":"no body"}') end
    local rows, err, code = db:query([[
      UPDATE items SET name = coalesce($2::json->>'name', name),
                       qty = coalesce(($2::json->>'qty')::int, qty)
      WHERE id = $1 RETURNING row_to_json(items)::text AS body]], id, body)
    if not rows then return fail(res, err, code) end
    if not rows[1] then return json(res, 404, '{"error":"not found"}') end
    json(res, 200, rows[1].body)
  end)

  app:delete("/items/:id", function(req, res)
    local id = id_of(req)
    if not id then return json(res, 404, '{"error":"not found"}') end
    local rows, err, code = db:query("DELETE FROM items WHERE id = $1", id)
    if not rows then return fail(res, err, code) end
    if rows.affected == 0 then return json(res, 404, '{"error":"not found"}') end
    res:status(204):send("")
  end)

  return app
end

-- required as a module (the spec): the router only
if select("#", ...) > 0 and (...) == "pg_api" then return M end

local port = tonumber(arg and arg[1]) or 8080
local url = os.getenv("PG_URL") or "postgresql:///postgres"
local pool = pg.pool { url = url, size = 10 }
local app = M.router(pool)
http.serve {
  host = "127.0.0.1", port = port, handler = app,
  on_listen = function(srv)
    assert(pool:query(M.SCHEMA))
    print(("pg_api on http://%s:%d/items  (Ctrl-C to stop)"):format(srv.host, srv.port))
    io.stdout:flush()
  end,
}
