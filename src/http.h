/* http: HTTP/1.1 on llhttp: connections (HttpConn), request and response heads.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_HTTP_H
#define MW_HTTP_H

#include <lua.h>

/* Registers HttpConn and the head builders into the module table on top. */
void mw_http_open(lua_State *L);

#endif
