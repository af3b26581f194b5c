-- luacheck configuration: Lua 5.4, no globals of our own.
std = "lua54"
max_line_length = 120
-- `local x <close> = ...` holds a value only to close it: name such locals with a leading _
ignore = { "211/_.*" }
files["spec/"] = { std = "+busted" }
-- wrk scripts define their hooks and use `wrk` as globals, by wrk's contract
local wrk = { globals = { "wrk", "setup", "init", "delay", "request", "response", "done" } }
files["bench/scripts/"] = wrk
files["bench/http_hello.d/pipeline.lua"] = wrk
files["spec/wrk_scripts/"] = wrk
