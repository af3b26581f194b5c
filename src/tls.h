/* tls: OpenSSL contexts and the TLS transport of the stream layer.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_TLS_H
#define MW_TLS_H

#include <lua.h>

/* Registers contexts and starttls/tls_info/set_tls into the module table on top. */
void mw_tls_open(lua_State *L);

#endif
