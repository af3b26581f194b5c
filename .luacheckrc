-- luacheck configuration: Lua 5.4, no globals of our own.
std = "lua54"
max_line_length = 110
-- `local x <close> = ...` holds a value only to close it: name such locals with a leading _
ignore = { "211/_.*" }
files["spec/"] = { std = "+busted" }
-- wrk scripts define their hooks as globals by contract
files["bench/scripts/"] = { allow_defined_top = true }
