/* redis: RESP commands from Lua arguments, replies as Lua values, and RespConn, a shared
 * auto-pipelined connection (redis.c; the Lua-free scanner is resp.c). The module's entry
 * (core.c) calls the open function in layer order. */
#ifndef MW_REDIS_H
#define MW_REDIS_H

#include <lua.h>

/* Registers the RESP codec, the decoder and RespConn into the module table on top. */
void mw_redis_open(lua_State *L, int rtidx);

#endif
