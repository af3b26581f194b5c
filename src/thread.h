/* thread: OS threads each running its own Lua state, and shared counters.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_THREAD_H
#define MW_THREAD_H

#include <lua.h>

/* Registers thread_new and the shared counters into the module table on top. */
void mw_thread_open(lua_State *L, int rtidx);

#endif
