/* fs: file system helpers for the Lua layer (stat, realpath).
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_FS_H
#define MW_FS_H

#include <lua.h>

/* Registers stat and realpath into the module table on top. */
void mw_fs_open(lua_State *L);

#endif
