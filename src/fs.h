/* fs: file system helpers for the Lua layer (stat, realpath, open_file).
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_FS_H
#define MW_FS_H

#include <lua.h>

/* Registers stat, realpath and open_file into the module table on top. */
void mw_fs_open(lua_State *L);

#endif
