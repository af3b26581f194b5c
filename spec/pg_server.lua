-- spec/pg_server.lua: a throwaway PostgreSQL 15 cluster for the specs.
-- start() creates a temporary directory owned by the `postgres` user (PostgreSQL refuses
-- to run as root), a test CA and a server certificate for localhost/127.0.0.1, runs initdb
-- (superuser `postgres` with a password, SCRAM-SHA-256 for TCP, TLS on), and starts the
-- server on a free port of 127.0.0.1. stop() stops it (immediate mode) and removes the
-- directory; call it from teardown so it runs whatever happened.
local M = {}

local BIN = os.getenv("PG_BIN") or "/usr/lib/postgresql/15/bin"
M.PASSWORD = "s3cret'pw"

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

local function must(cmd)
  local ok, out = sh(cmd)
  if not ok then error(("command failed: %s\n%s"):format(cmd, out), 2) end
  return out
end

function M.available()
  return sh("test -x " .. BIN .. "/initdb && id postgres") and true or false
end

local function free_port()
  -- bind port 0, read the port the kernel gave, release it for the server
  local out = must([[python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])']])
  return tonumber(out:match("%d+"))
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function append(path, text)
  local f = assert(io.open(path, "a"))
  f:write(text)
  f:close()
end

-- PG_TASKSET=CPUS pins the server (bench/pg: the server on one core, the client on another)
local function pg_ctl(srv, args)
  local pin = os.getenv("PG_TASKSET")
  return sh(("%srunuser -u postgres -- %s/pg_ctl -D %s %s"):format(pin and ("taskset -c " .. pin .. " ") or "",
    BIN, srv.data, args))
end

function M.start()
  local dir = must("mktemp -d /tmp/mw-pg.XXXXXX"):gsub("%s+$", "")
  local srv = { dir = dir, data = dir .. "/data", sock = dir .. "/sock" }
  must("mkdir -p " .. srv.sock .. " && chown -R postgres " .. dir .. " && chmod 755 " .. dir)
  -- TLS: a CA and a server certificate for localhost and 127.0.0.1
  local ssl = ("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 "
    .. "-subj /CN=mw-test-ca && openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr "
    .. "-subj /CN=localhost && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext.cnf && "
    .. "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt "
    .. "-days 2 -extfile ext.cnf && chown postgres server.key server.crt && chmod 600 server.key"):format(dir)
  must(ssl)
  srv.ca = dir .. "/ca.pem"
  write(dir .. "/pw", M.PASSWORD .. "\n")
  must("chown postgres " .. dir .. "/pw")
  must(("runuser -u postgres -- %s/initdb -D %s -U postgres --pwfile=%s/pw -A scram-sha-256 "
    .. "--auth-local=trust -E UTF8 --locale=C --no-sync"):format(BIN, srv.data, dir))
  write(srv.data .. "/pg_hba.conf", table.concat({
    "local all all trust",
    "host all mw_bench 127.0.0.1/32 trust",   -- bench/pg only (no such role in the specs)
    "host all all 127.0.0.1/32 scram-sha-256",
    "", }, "\n"))
  append(srv.data .. "/postgresql.conf", table.concat({
    "", "ssl = on",
    ("ssl_cert_file = '%s/server.crt'"):format(dir),
    ("ssl_key_file = '%s/server.key'"):format(dir),
    "fsync = off", "synchronous_commit = off", "full_page_writes = off",
    "max_connections = 200", "password_encryption = 'scram-sha-256'", "", }, "\n"))
  srv.port = free_port()
  srv.url = ("postgresql://postgres:%s@127.0.0.1:%d/postgres?sslmode=disable")
    :format(M.PASSWORD:gsub("'", "%%27"), srv.port)
  srv.conninfo = ("host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable password='%s'")
    :format(srv.port, M.PASSWORD:gsub("'", "\\'"))
  M.srv = srv
  local ok, out = M.start_server(srv)
  if not ok then
    M.stop()
    error("pg_ctl start failed:\n" .. out)
  end
  return srv
end

function M.start_server(srv)
  return pg_ctl(srv or M.srv, ("-l %s/log -o \"-p %d -k %s -c listen_addresses=127.0.0.1\" -w start")
    :format((srv or M.srv).dir, (srv or M.srv).port, (srv or M.srv).sock))
end

function M.stop_server(mode)
  return pg_ctl(M.srv, "-m " .. (mode or "immediate") .. " -w stop")
end

-- Runs sql through psql on the Unix socket (trust), as setup outside the loop.
function M.psql(sql)
  local f = os.tmpname()
  write(f, sql)
  local out = must(("chmod 644 %s && runuser -u postgres -- /usr/bin/psql -X -q -v ON_ERROR_STOP=1 -h %s -p %d "
    .. "-d postgres -f %s"):format(f, M.srv.sock, M.srv.port, f))
  os.remove(f)
  return out
end

function M.stop()
  local srv = M.srv
  if not srv then return end
  M.srv = nil
  pg_ctl(srv, "-m immediate -w stop")
  sh("rm -rf " .. srv.dir)
end

return M
