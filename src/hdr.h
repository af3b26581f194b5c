/* hdr: HDR histograms (record, merge, percentiles) for moonwire bench.
 * The module's entry (core.c) calls the open function in layer order. */
#ifndef MW_HDR_H
#define MW_HDR_H

#include <lua.h>
#include <stdint.h>

/* Registers the histogram type into the module table on top. */
void mw_hdr_open(lua_State *L);

/* For C recorders (the HTTP/2 bench driver): the histogram at idx (raises if it is not
 * one), and recording a value into it without a Lua call per sample. */
typedef struct mw_hdr mw_hdr;
mw_hdr *mw_hdr_check(lua_State *L, int idx);
void mw_hdr_record(mw_hdr *h, uint64_t v);

#endif
