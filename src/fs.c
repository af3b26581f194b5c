/* fs: the few file-system calls the Lua layer needs (static files): stat and realpath.
 * Non-blocking-safe enough for local files; no Lua state kept here. */
#define _GNU_SOURCE
#include "fs.h"
#include "sched.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* stat(path) -> size, mtime (integer seconds), kind ("file"|"dir"|"other"), or nil, err, code */
static int l_stat(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    if (strlen(path) != len) return mw_pushfail(L, "path contains a NUL byte", "EINVAL");
    struct stat st;
    if (stat(path, &st) < 0) return mw_pusherrno(L, errno);
    lua_pushinteger(L, (lua_Integer)st.st_size);
    lua_pushinteger(L, (lua_Integer)st.st_mtime);
    lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : "other");
    return 3;
}

/* realpath(path) -> the canonical absolute path (symlinks resolved), or nil, err, code */
static int l_realpath(lua_State *L)
{
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    if (strlen(path) != len) return mw_pushfail(L, "path contains a NUL byte", "EINVAL");
    char *r = realpath(path, NULL);
    if (!r) return mw_pusherrno(L, errno);
    lua_pushstring(L, r);
    free(r);
    return 1;
}

void mw_fs_open(lua_State *L)
{
    static const luaL_Reg f[] = { { "stat", l_stat }, { "realpath", l_realpath }, { NULL, NULL } };
    luaL_setfuncs(L, f, 0);
}
