/* h2mem: a region of pages for a server session's creation-time nghttp2 blocks (see
 * h2mem.h). A block in the region is never reused once nghttp2 frees it (a freed block
 * stays mapped until the session goes), but for the area's (the spare half of the HPACK
 * rings' page: small blocks made while frames are fed, its granules reused); anything that
 * does not fit, and every other allocation after creation, is a heap block (malloc's, small
 * ones recycled per thread). madvise only ever covers whole pages of the region, which is
 * ours alone. */
#define _GNU_SOURCE
#include "h2mem.h"
#include "sanitize.h"

#include <stdint.h>
#include <stdlib.h>
#include <malloc.h>
#include <string.h>
#include <sys/mman.h>
#include <pthread.h>
#include <unistd.h>
#ifdef MW_SANITIZED
#include <sanitizer/asan_interface.h>
#define AREA_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define AREA_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define AREA_POISON(p, n) ((void)(p), (void)(n))
#define AREA_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* Room for what nghttp2 1.52 makes at creation after the session struct, in its order: the
 * HPACK deflater's and inflater's rings of 1 KiB share a page (written once a response has
 * gone out, or the client indexes a field), the stream map's 4 KiB table has the next (zero
 * again whenever no stream is open), the frame buffer (16 KiB + 10 bytes) the next five; a
 * page to spare. Address space only: pages never written are not resident. (Another order
 * or other sizes cost resident pages, never correctness.) */
#define REGION_PAGES 8
#define SMALL 1024             /* smaller blocks (bookkeeping nghttp2 writes at once) go to malloc */
#define RING (128 * sizeof(void *))  /* an HPACK ring: 128 entry pointers (h2mem.h) */
#define FRAME 16384            /* a block this large is the frame buffer (the minimum frame
                                * payload; nothing else nghttp2 makes at creation is as large) */

static size_t page_size(void)
{
    static size_t ps;
    if (!ps) {
        long v = sysconf(_SC_PAGESIZE);
        ps = v > 0 ? (size_t)v : 4096;
    }
    return ps;
}

static int in_region(const mw_h2mem *m, const void *p)
{
    return m->region && (const unsigned char *)p >= m->region &&
           (const unsigned char *)p < m->region + REGION_PAGES * page_size();
}

/* A block in the region, or NULL (then malloc's). The session struct, nghttp2's first
 * block, stays on the heap: it is written at once and is live for good, and there it takes
 * its 2.9 KiB, not a page. */
static void *take(mw_h2mem *m, size_t size)
{
    if (!m->creating || m->creating++ == 1 || size < SMALL) return NULL;
    size_t ps = page_size(), cap = REGION_PAGES * ps;
    if (!m->region) {
        void *r = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (r == MAP_FAILED) {
            m->creating = 0;   /* no region: malloc for all */
            return NULL;
        }
        m->region = r;
    }
    /* a block of a page or more owns its pages whole (no other block shares the pages a
     * trim may give back); smaller ones are packed, none across a page boundary */
    size_t off = size >= ps ? (m->used + ps - 1) & ~(ps - 1) : (m->used + 15) & ~(size_t)15;
    if (size < ps && (off & (ps - 1)) + size > ps) off = (off + ps - 1) & ~(ps - 1);
    size_t len = size >= ps ? (size + ps - 1) & ~(ps - 1) : size;
    if (off > cap || len > cap - off) return NULL;
    m->used = off + len;
    if (size < ps) {
        size_t pg = off / ps;
        _Static_assert(sizeof m->rings >= REGION_PAGES, "a count per page");
        if (pg < REGION_PAGES) {
            if (size == RING) {
                m->rings[pg]++;
                if (m->nrings < 2) m->ring_off[m->nrings] = off;
                m->nrings++;
            } else {
                m->others[pg]++;
            }
        }
    }
    if (size >= FRAME && !m->frame_len) {
        m->frame_off = off;
        m->frame_len = len;
    }
    return m->region + off;
}

/* Blocks from outside the region are malloc's. nghttp2 makes and frees about four small
 * ones per request (the stream, its outbound items, the header list copy): freed ones wait
 * on a per-thread list by size class (what malloc_usable_size says they hold, in steps of
 * 16 bytes) for the next request, as many as SC_KEEP per class, instead of going through
 * free and malloc each time. No header: an idle session's blocks cost what malloc's do. */
#define SC_STEP 16
#define SC_MAX 512
#define SC_N (SC_MAX / SC_STEP)
#ifdef MW_SANITIZED
#define SC_KEEP 0              /* sanitize.h: every block goes back to free() */
#else
#define SC_KEEP 1024           /* (a garbage collection lets go of hundreds of streams at once) */
#endif

typedef struct freeblk {
    struct freeblk *next;
} freeblk;

static __thread freeblk *sc_head[SC_N + 1];
static __thread unsigned sc_count[SC_N + 1];

#if SC_KEEP > 0
/* A thread that ends (core.thread) gives its lists' blocks back. */
static pthread_key_t sc_key;
static __thread int sc_registered;
static pthread_once_t sc_once = PTHREAD_ONCE_INIT;

static void sc_drain(void *unused)
{
    (void)unused;
    for (int c = 0; c <= SC_N; c++) {
        freeblk *f = sc_head[c];
        while (f) {
            freeblk *nx = f->next;
            free(f);
            f = nx;
        }
        sc_head[c] = NULL;
        sc_count[c] = 0;
    }
}

static void sc_key_make(void) { (void)pthread_key_create(&sc_key, sc_drain); }
#endif

void *mw_h2mem_alloc(size_t size)
{
    if (size <= SC_MAX) {
        size_t cls = size ? (size + SC_STEP - 1) / SC_STEP : 1;
        freeblk *f = sc_head[cls];
        if (f) {
            sc_head[cls] = f->next;
            sc_count[cls]--;
            return f;
        }
        return malloc(cls * SC_STEP);
    }
    return malloc(size);
}

void mw_h2mem_release(void *ptr)
{
#if SC_KEEP > 0
    size_t have = malloc_usable_size(ptr);
    if (have >= SC_STEP && have <= SC_MAX + SC_STEP - 1) {
        size_t cls = have / SC_STEP;              /* it holds cls * SC_STEP bytes at least */
        if (cls > SC_N) cls = SC_N;
        if (sc_count[cls] < SC_KEEP) {
            if (!sc_registered) {                        /* the thread's first: its destructor */
                sc_registered = 1;
                (void)pthread_once(&sc_once, sc_key_make);
                (void)pthread_setspecific(sc_key, sc_head);
            }
            freeblk *f = ptr;
            f->next = sc_head[cls];
            sc_head[cls] = f;
            sc_count[cls]++;
            return;
        }
    }
#endif
    free(ptr);
}

/* ---- the area: the spare half of the rings' page (h2mem.h) ---- */
#define GRAN 32

void mw_h2mem_end(mw_h2mem *m)
{
    m->creating = 0;
    size_t ps = page_size();
    /* nghttp2 1.52's layout: two rings, one after the other from the start of a page that
     * holds nothing else; any other: no area */
    if (!m->region || m->nrings != 2 || m->ring_off[0] % ps != 0 || m->ring_off[1] != m->ring_off[0] + RING)
        return;
    size_t pg = m->ring_off[0] / ps;
    if (pg >= REGION_PAGES || m->rings[pg] != 2 || m->others[pg] != 0 || ps < 2 * RING + GRAN) return;
    size_t n = (ps - 2 * RING) / GRAN;
    m->ngran = n > 64 ? 64 : (unsigned)n;
    m->area = m->region + m->ring_off[0] + 2 * RING;
    m->ause = m->astart = 0;
    AREA_POISON(m->area, (size_t)m->ngran * GRAN);
}

static int in_area(const mw_h2mem *m, const void *p)
{
    return m->area && (const unsigned char *)p >= m->area &&
           (const unsigned char *)p < m->area + (size_t)m->ngran * GRAN;
}

/* k granules in a row, first fit, or NULL */
static void *area_take(mw_h2mem *m, size_t size)
{
    unsigned k = size ? (unsigned)((size + GRAN - 1) / GRAN) : 1;
    uint64_t all = m->ngran == 64 ? ~(uint64_t)0 : (((uint64_t)1 << m->ngran) - 1);
    uint64_t fit = ~m->ause & all;             /* bit i: granules i .. i+k-1 all free */
    for (unsigned i = 1; i < k && fit; i++) fit &= fit >> 1;
    if (!fit) return NULL;
    unsigned g = (unsigned)__builtin_ctzll(fit);
    uint64_t run = (k == 64 ? ~(uint64_t)0 : (((uint64_t)1 << k) - 1)) << g;
    m->ause |= run;
    m->astart |= (uint64_t)1 << g;
    unsigned char *p = m->area + (size_t)g * GRAN;
    AREA_UNPOISON(p, size ? size : 1);
    return p;
}

/* the block at p: its first granule and how many it has */
static unsigned area_block(const mw_h2mem *m, const void *p, unsigned *first)
{
    unsigned g = (unsigned)(((const unsigned char *)p - m->area) / GRAN);
    uint64_t after = g == 63 ? 0 : ~(((uint64_t)2 << g) - 1);   /* the granules above g */
    uint64_t ends = (~m->ause | m->astart) & after;
    unsigned e = ends ? (unsigned)__builtin_ctzll(ends) : 64;
    if (e > m->ngran) e = m->ngran;
    *first = g;
    return e - g;
}

static void area_give(mw_h2mem *m, void *p)
{
    unsigned g, n = area_block(m, p, &g);
    uint64_t run = (n == 64 ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1)) << g;
    m->ause &= ~run;
    m->astart &= ~((uint64_t)1 << g);
    AREA_POISON(m->area + (size_t)g * GRAN, (size_t)n * GRAN);
}

static size_t blk_cap(void *ptr)
{
    return malloc_usable_size(ptr);
}

static void *h_malloc(size_t size, void *ud)
{
    mw_h2mem *m = ud;
    void *p = m->creating ? take(m, size) : m->feeding && m->area && size <= MW_H2MEM_AREA_MAX ? area_take(m, size) : NULL;
    return p ? p : mw_h2mem_alloc(size);
}

static void h_free(void *ptr, void *ud)
{
    mw_h2mem *m = ud;
    if (!ptr) return;
    if (in_region(m, ptr)) {
        if (in_area(m, ptr)) area_give(m, ptr);
        else if (m->frame_len && (unsigned char *)ptr == m->region + m->frame_off) m->frame_len = 0;
        return;
    }
    mw_h2mem_release(ptr);
}

static void *h_calloc(size_t n, size_t size, void *ud)
{
    mw_h2mem *m = ud;
    if (size && n > SIZE_MAX / size) return NULL;
    void *p = m->creating ? take(m, n * size) : NULL;
    /* a block of the region is zero already: its pages were mapped fresh, no offset is
     * handed out twice, and a trim only ever makes pages read back as zeros (not the
     * area's: its granules are reused) */
    if (p) return p;
    if (m->feeding && m->area && n * size <= MW_H2MEM_AREA_MAX) p = area_take(m, n * size);
    if (!p) p = mw_h2mem_alloc(n * size);
    if (p) memset(p, 0, n * size);
    return p;
}

static void *h_realloc(void *ptr, size_t size, void *ud)
{
    mw_h2mem *m = ud;
    /* a block that grows (a priority queue's array, a buffer) lives as long as what it
     * holds, often the session: never the area's, which an idle session must empty */
    if (!ptr) return m->creating ? h_malloc(size, ud) : mw_h2mem_alloc(size);
    size_t have;
    if (in_area(m, ptr)) {
        unsigned g;
        have = (size_t)area_block(m, ptr, &g) * GRAN;
        AREA_UNPOISON(ptr, have);              /* (copied whole below, then given back) */
        if (size <= have) return ptr;
    } else if (in_region(m, ptr)) {
        /* the old block's size is not kept: copy up to the region's end */
        have = (size_t)(m->region + REGION_PAGES * page_size() - (unsigned char *)ptr);
    } else {
        have = blk_cap(ptr);
        if (size <= have) return ptr;
    }
    void *p = mw_h2mem_alloc(size);
    if (!p) return NULL;
    memcpy(p, ptr, size < have ? size : have);
    h_free(ptr, ud);
    return p;
}

void mw_h2mem_init(mw_h2mem *m)
{
    memset(m, 0, sizeof *m);
    m->hooks.mem_user_data = m;
    m->hooks.malloc = h_malloc;
    m->hooks.free = h_free;
    m->hooks.calloc = h_calloc;
    m->hooks.realloc = h_realloc;
}

static int zero_page(const unsigned char *p, size_t n)
{
    const uint64_t *w = (const uint64_t *)(const void *)p;
    for (size_t i = 0; i < n / 8; i += 8) {
        uint64_t acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc) return 0;
    }
    return 1;
}

size_t mw_h2mem_trim(mw_h2mem *m)
{
    if (!m->region) return 0;
    size_t ps = page_size(), given = 0;
    size_t end = (m->used + ps - 1) & ~(ps - 1);
    for (size_t off = 0; off < end; off += ps) {
        int frame = m->frame_len && off >= m->frame_off && off < m->frame_off + m->frame_len;
        /* (the rings' page with its area is mw_h2mem_trim_hpack's: its free granules hold
         * what their blocks left) */
        if (m->area && m->region + off == m->area - 2 * RING) continue;
        if (frame ? !m->drained : !zero_page(m->region + off, ps)) continue;
        if (madvise(m->region + off, ps, MADV_DONTNEED) == 0) given += ps;
    }
    return given;
}

size_t mw_h2mem_trim_hpack(mw_h2mem *m)
{
    /* the layout nghttp2 1.52 makes (a deflater's and an inflater's ring); any other: keep */
    if (!m->region || m->nrings != 2 || m->ause) return 0;
    size_t ps = page_size(), given = 0;
    for (size_t pg = 0; pg < REGION_PAGES; pg++) {
        if (!m->rings[pg] || m->others[pg]) continue;
        if (madvise(m->region + pg * ps, ps, MADV_DONTNEED) == 0) given += ps;
    }
    return given;
}

void mw_h2mem_free(mw_h2mem *m)
{
    /* (the shadow of poisoned bytes outlives munmap: the next mapping there must start clean) */
    if (m->area) AREA_UNPOISON(m->area, (size_t)m->ngran * GRAN);
    if (m->region) munmap(m->region, REGION_PAGES * page_size());
    m->region = NULL;
    m->used = m->frame_len = 0;
    m->area = NULL;
    m->ause = m->astart = 0;
}
