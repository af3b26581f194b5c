/* pg: PostgreSQL connections on libpq's asynchronous API, driven by moonwire's loop.
 * The connection's socket is registered with the loop; a task that must wait parks until
 * the socket is readable or writable (libpq never blocks the loop, except for host name
 * resolution inside PQconnectStart: the Lua layer resolves names first and passes
 * hostaddr). Queries from many tasks share one connection through libpq's pipeline mode:
 * each is sent with its own Sync at once, and results come back in FIFO order. */
#ifndef MW_PG_H
#define MW_PG_H

#include "sched.h"

/* Registers core.pg (connect_start, null, the PgConn methods) into the table on top. */
void mw_pg_open(lua_State *L, int rtidx);

#endif
