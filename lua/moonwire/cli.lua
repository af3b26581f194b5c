--- The `moonwire` command line: subcommand dispatch.
local M = {}

local usage = [[
usage: moonwire <command> [args]

commands:
  run SCRIPT [ARGS...]   run a Lua script (it calls require "moonwire" itself)
  bench [OPTIONS] URL    load test (wrk-compatible; moonwire bench --help)
  version                print the version
  help, --help, -h       this text
]]

local commands = {}

function commands.version()
  local mw = require "moonwire"
  io.stdout:write("moonwire ", mw.version, " (", _VERSION, ")\n")
  return 0
end

function commands.bench(args)
  return require("moonwire.bench.cli").main(args)
end

function commands.help()
  io.stdout:write(usage)
  return 0
end
commands["--help"] = commands.help
commands["-h"] = commands.help

function commands.run(args)
  local script = args[1]
  if not script then
    io.stderr:write("moonwire run: a script is required\n", usage)
    return 2
  end
  local chunk, err = loadfile(script)
  if not chunk then
    io.stderr:write("moonwire run: ", err, "\n")
    return 1
  end
  local script_args = { [0] = script, table.unpack(args, 2) }
  _G.arg = script_args
  local ok, msg = xpcall(chunk, debug.traceback, table.unpack(script_args))
  if not ok then
    io.stderr:write("moonwire: ", tostring(msg), "\n")
    return 1
  end
  return 0
end

--- Runs the command line `argv` (as the global `arg`); returns the exit status.
function M.main(argv)
  local name = argv[1]
  local cmd = name and commands[name]
  if not cmd then
    io.stderr:write(name and ("moonwire: unknown command '" .. name .. "'\n") or "", usage)
    return 2
  end
  return cmd({ table.unpack(argv, 2) })
end

return M
