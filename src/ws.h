/* ws: RFC 6455 frames (WsConn), the accept key, random bytes, UTF-8 checks.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_WS_H
#define MW_WS_H

#include <lua.h>

/* Registers WsConn, accept_key, random and utf8_valid into the module table on top. */
void mw_ws_open(lua_State *L);

#endif
