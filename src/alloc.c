/* alloc: a size-class allocator for the Lua state's small objects.
 *
 * A server's Lua heap is mostly small objects that live for one request (tables, strings,
 * closures) or for one connection. glibc's malloc handles the first kind through its
 * per-size caches only up to a few blocks each, then through its general bins, and puts a
 * header on every block. Here every size class (8-byte steps to 256 bytes, 32-byte steps
 * to 1 KiB) has its own free list: allocating and freeing are a pop and a push, blocks
 * carry no header, and a garbage collection's burst of frees never goes back through the
 * bins. Larger blocks go to the allocator the state had before.
 *
 * Blocks come from one reserved range of address space (reserved, not committed: pages
 * are touched only as they are carved), so whether a pointer is ours is a range check;
 * blocks allocated before we were installed are handed back to the previous allocator.
 * Freed blocks stay in their class for reuse (memory is not returned to the system).
 * Each Lua state (each core.thread) has its own arena: the state's allocations all happen
 * on its own thread. The arena is unmapped when lua_close frees the state's main block.
 *
 * Not installed in sanitizer builds (ASan must see every allocation) or when the
 * environment has MOONWIRE_ALLOC=system. */
#define _GNU_SOURCE
#include "alloc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "sanitize.h"

#define SMALL_MAX 256           /* 8-byte classes up to here */
#define CLASS_MAX 1024          /* 32-byte classes up to here; larger: the previous allocator */
#define NCLASS (SMALL_MAX / 8 + (CLASS_MAX - SMALL_MAX) / 32)
#define PAGE (64 * 1024)        /* a class takes its blocks from pages of this size */
#define RESERVE ((size_t)16 << 30)

typedef struct block { struct block *next; } block;

typedef struct arena {
    lua_Alloc prev;             /* the allocator we replaced, and its ud */
    void *prev_ud;
    void *lg;                   /* the state's main block: freed last by lua_close */
    char *lo, *hi, *bump;       /* the reserved range; the next page to give out */
    block *free[NCLASS];
    char *cur[NCLASS], *end[NCLASS];  /* each class's page being carved */
} arena;

static inline int class_of(size_t n)
{
    return n <= SMALL_MAX ? (int)((n + 7) >> 3) - 1 : SMALL_MAX / 8 + (int)((n - SMALL_MAX + 31) >> 5) - 1;
}

static inline size_t class_size(int c)
{
    return c < SMALL_MAX / 8 ? (size_t)(c + 1) * 8 : SMALL_MAX + (size_t)(c - SMALL_MAX / 8 + 1) * 32;
}

static void *small_alloc(arena *a, size_t n)
{
    int c = class_of(n);
    block *b = a->free[c];
    if (b) {
        a->free[c] = b->next;
        return b;
    }
    size_t sz = class_size(c);
    if (a->cur[c] + sz > a->end[c]) {
        if (a->bump + PAGE > a->hi) return NULL;     /* range used up: the caller falls back */
        a->cur[c] = a->bump;
        a->end[c] = a->bump + PAGE;
        a->bump += PAGE;
    }
    void *p = a->cur[c];
    a->cur[c] += sz;
    return p;
}

static inline void small_free(arena *a, void *p, size_t n)
{
    int c = class_of(n);
    block *b = p;
    b->next = a->free[c];
    a->free[c] = b;
}

static inline int ours(const arena *a, const void *p)
{
    return (const char *)p >= a->lo && (const char *)p < a->hi;
}

/* Everything but the two common cases below: carving a new block, resizing, the previous
 * allocator's blocks, the state's last free. Kept out of line so that arena_alloc's fast
 * paths save no registers. */
static __attribute__((noinline)) void *arena_slow(arena *a, void *ptr, size_t osize, size_t nsize)
{
    if (ptr == NULL) {                  /* osize is the object's type here, not a size */
        if (nsize == 0) return NULL;
        if (nsize <= CLASS_MAX) {
            void *p = small_alloc(a, nsize);
            if (p) return p;
        }
        return a->prev(a->prev_ud, NULL, osize, nsize);
    }
    if (ours(a, ptr)) {
        if (nsize == 0) {
            small_free(a, ptr, osize);
            return NULL;
        }
        if (nsize <= CLASS_MAX && class_of(nsize) == class_of(osize)) return ptr;
        void *p = nsize <= CLASS_MAX ? small_alloc(a, nsize) : NULL;
        if (!p) p = a->prev(a->prev_ud, NULL, 0, nsize);
        if (!p) return nsize <= osize ? ptr : NULL;  /* a shrink must not fail */
        memcpy(p, ptr, osize < nsize ? osize : nsize);
        small_free(a, ptr, osize);
        return p;
    }
    /* a block of the previous allocator */
    if (nsize == 0) {
        int last = ptr == a->lg;
        a->prev(a->prev_ud, ptr, osize, 0);
        if (last) {                     /* lua_close is done with the state: the arena too */
            munmap(a->lo, (size_t)(a->hi - a->lo));
            free(a);
        }
        return NULL;
    }
    return a->prev(a->prev_ud, ptr, osize, nsize);
}

/* The state's allocator: a new small block from its class's free list, or a small block
 * freed onto it, inline; the rest in arena_slow. */
static void *arena_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    arena *a = ud;
    if (ptr == NULL) {
        if (nsize - 1 < CLASS_MAX) {    /* 1..CLASS_MAX */
            int c = class_of(nsize);
            block *b = a->free[c];
            if (b) {
                a->free[c] = b->next;
                return b;
            }
        }
    } else if (nsize == 0 && ours(a, ptr)) {
        small_free(a, ptr, osize);
        return NULL;
    }
    return arena_slow(a, ptr, osize, nsize);
}

void mw_alloc_install(lua_State *L)
{
#if defined(MW_SANITIZED)
    (void)L;
#else
    const char *e = getenv("MOONWIRE_ALLOC");
    if (e && strcmp(e, "system") == 0) return;
    void *prev_ud;
    lua_Alloc prev = lua_getallocf(L, &prev_ud);
    if (prev == arena_alloc) return;    /* already installed (the module opened twice) */
    arena *a = calloc(1, sizeof *a);
    if (!a) return;
    void *lo = mmap(NULL, RESERVE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (lo == MAP_FAILED) {
        free(a);
        return;                         /* no address space to spare: keep the system's */
    }
    a->prev = prev;
    a->prev_ud = prev_ud;
    a->lo = a->bump = lo;
    a->hi = a->lo + RESERVE;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    a->lg = lua_getextraspace(lua_tothread(L, -1));
    lua_pop(L, 1);
    lua_setallocf(L, arena_alloc, a);
#endif
}

/* core.allocator() -> "moonwire" when the state uses the size-class allocator, else "system" */
int mw_alloc_name(lua_State *L)
{
    void *ud;
    lua_pushstring(L, lua_getallocf(L, &ud) == arena_alloc ? "moonwire" : "system");
    return 1;
}
