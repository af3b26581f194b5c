/* tls: OpenSSL contexts and the TLS transport of the stream layer.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_TLS_H
#define MW_TLS_H

#include <lua.h>

struct mw_sock;

/* Registers contexts and starttls/tls_info/set_tls into the module table on top. */
void mw_tls_open(lua_State *L);
/* 1 when s is a TLS stream whose end (a read that returned 0) came without the peer's
 * close_notify: a bare TCP FIN, which anyone on the path can forge, so whatever only the
 * close delimits may have been cut short. 0 for a plain socket or a clean end. */
int mw_tls_truncated(const struct mw_sock *s);

#endif
