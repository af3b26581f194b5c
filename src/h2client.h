/* h2client: HTTP/2 client connections on libnghttp2 (H2Client, H2ClientStream) and the
 * HTTP/2 bench driver (H2Bench), see h2client.c. The module's entry (core.c) calls the
 * open function in layer order. */
#ifndef MW_H2CLIENT_H
#define MW_H2CLIENT_H

#include <lua.h>

/* Registers h2_client, h2_bench and their types into the table on top. */
void mw_h2client_open(lua_State *L);

#endif
