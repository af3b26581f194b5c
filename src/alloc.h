/* alloc: the size-class allocator of the Lua state (see alloc.c).
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_ALLOC_H
#define MW_ALLOC_H

#include <lua.h>

/* Installs the allocator into L (not in sanitizer builds, nor with MOONWIRE_ALLOC=system). */
void mw_alloc_install(lua_State *L);
/* core.allocator() -> "moonwire" or "system": which allocator the state uses. */
int mw_alloc_name(lua_State *L);

#endif
