/* mwzlib: the open function of zlib.c (gzip/gunzip, streaming deflate/inflate); not named
 * zlib.h, which is zlib's own header.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_MWZLIB_H
#define MW_MWZLIB_H

#include <lua.h>

/* Registers gzip, gunzip, deflater and inflater into the module table on top. */
void mw_zlib_open(lua_State *L);

#endif
