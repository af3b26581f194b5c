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

/* Room for what nghttp2 1.52 makes at creation, in its order: the session struct (2.9 KiB,
 * alone on the first page: mw_h2mem_stow gives it back with the others while the connection
 * idles), the HPACK deflater's and inflater's rings of 1 KiB sharing the next page (written
 * once a response has gone out, or the client indexes a field), the stream map's 4 KiB table
 * the next (zero again whenever no stream is open), the frame buffer (16 KiB + 10 bytes) the
 * next five; a page to spare. Address space only: pages never written are not resident.
 * (Another order or other sizes cost resident pages, never correctness.) */
#define REGION_PAGES 9
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
 * block, takes the region's first pages alone: live for good, it is what a stowed session
 * copies out word by word (mw_h2mem_stow). */
static void *take(mw_h2mem *m, size_t size)
{
    if (!m->creating) return NULL;
    int first = m->creating++ == 1;
    if (!first && size < SMALL) return NULL;
    size_t ps = page_size(), cap = REGION_PAGES * ps;
    if (!m->region) {
        void *r = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (r == MAP_FAILED) {
            m->creating = 0;   /* no region: malloc for all */
            return NULL;
        }
        m->region = r;
    }
    if (first) {
        size_t len = (size + ps - 1) & ~(ps - 1);
        if (m->used || len > cap / 2) return NULL;
        m->used = len;
        return m->region;
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
    if (!m->region || m->stowed) return 0;       /* (stowed: given back already) */
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
    if (!m->region || m->stowed || m->nrings != 2 || m->ause) return 0;
    size_t ps = page_size(), given = 0;
    for (size_t pg = 0; pg < REGION_PAGES; pg++) {
        if (!m->rings[pg] || m->others[pg]) continue;
        if (madvise(m->region + pg * ps, ps, MADV_DONTNEED) == 0) given += ps;
    }
    return given;
}

/* ---- stowing an idle session (h2mem.h) ---- *
 * A stow keeps, of the stowed pages' words, those that differ from a prediction: the words
 * of the first session this process stowed (the template), its pointers into its own region
 * moved to this one's. Most of a session struct is the same in every session (the
 * callbacks, the settings, the pointers between its own parts), so an idle session keeps
 * ~40 words where it has ~130 that are not zero. Dead words (below) are not kept and may
 * come back as the template's. */

/* The region's words as a stow reads and writes them: whole words, where ASan may have
 * poisoned the tail of a live area block smaller than its granules (AREA_UNPOISON covers a
 * block's size only). The loads and stores are volatile, so that no memcpy (which ASan's
 * interceptor checks) is made of them. */
#ifdef MW_SANITIZED
#define NO_ASAN __attribute__((no_sanitize_address))
#else
#define NO_ASAN
#endif

NO_ASAN static uint64_t word_get(const mw_h2mem *m, size_t i)
{
    return ((const volatile uint64_t *)(const void *)m->region)[i];
}

NO_ASAN static void word_put(mw_h2mem *m, size_t i, uint64_t v)
{
    ((volatile uint64_t *)(void *)m->region)[i] = v;
}

/* Whether the word at index i of the region is dead: a free granule of the area, a ring's
 * slot when the rings are dead (nghttp2 writes both before it reads them). */
static int dead_word(const mw_h2mem *m, size_t i, int hpack_dead)
{
    const unsigned char *p = m->region + i * 8;
    if (!m->area) return 0;
    if (p >= m->area - 2 * RING && p < m->area) return hpack_dead;
    return in_area(m, p) && !(m->ause >> ((size_t)(p - m->area) / GRAN) & 1);
}

/* The pages a stow covers: every page handed out but the frame buffer's. */
static int stow_page(const mw_h2mem *m, size_t pg)
{
    size_t ps = page_size(), off = pg * ps;
    if (off >= ((m->used + ps - 1) & ~(ps - 1))) return 0;
    return !(m->frame_len && off >= m->frame_off && off < m->frame_off + m->frame_len);
}

/* The template: words 0 .. n-1 of the first stowed region, a pointer into that region kept
 * as its offset (rel set). Made once per process, never changed or freed after. */
typedef struct {
    size_t n;
    uint64_t *val;
    unsigned char *rel;
} stow_tmpl;

static stow_tmpl *the_tmpl;

static stow_tmpl *tmpl_get(void)
{
    return __atomic_load_n(&the_tmpl, __ATOMIC_ACQUIRE);
}

static void tmpl_make(const mw_h2mem *m, uint32_t pages, int hpack_dead)
{
    if (tmpl_get()) return;
    size_t ps = page_size(), wpp = ps / 8, top = 0;
    for (size_t pg = 0; pg < REGION_PAGES; pg++)
        if (pages >> pg & 1) top = pg + 1;
    stow_tmpl *nt = malloc(sizeof *nt);
    if (!nt) return;
    nt->n = top * wpp;
    nt->val = calloc(nt->n ? nt->n : 1, sizeof *nt->val);
    nt->rel = calloc(nt->n ? nt->n : 1, 1);
    if (!nt->val || !nt->rel) {
        free(nt->val);
        free(nt->rel);
        free(nt);
        return;
    }
    uintptr_t lo = (uintptr_t)m->region, hi = lo + REGION_PAGES * ps;
    for (size_t i = 0; i < nt->n; i++) {
        if (!(pages >> (i / wpp) & 1) || dead_word(m, i, hpack_dead)) continue;
        uint64_t v = word_get(m, i);
        nt->rel[i] = v >= lo && v < hi;
        nt->val[i] = nt->rel[i] ? v - lo : v;
    }
    stow_tmpl *none = NULL;
    if (!__atomic_compare_exchange_n(&the_tmpl, &none, nt, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        free(nt->val);
        free(nt->rel);
        free(nt);
    }
}

/* What the template says word i of this region holds (0 past it). */
static uint64_t predict(const mw_h2mem *m, const stow_tmpl *t, size_t i)
{
    if (!t || i >= t->n) return 0;
    return t->rel[i] ? (uint64_t)(uintptr_t)m->region + t->val[i] : t->val[i];
}

/* ASan: a stowed page is poisoned, but the area's bytes, whose shadow says which granules
 * are live (it must outlive the stow; nothing reaches them but through the poisoned rings
 * and session struct). */
static void stow_poison(mw_h2mem *m, size_t pg, int poison)
{
    size_t ps = page_size();
    unsigned char *p = m->region + pg * ps;
    size_t n = ps;
    if (m->area && p == m->area - 2 * RING) n = 2 * RING;
    if (poison) AREA_POISON(p, n);
    else AREA_UNPOISON(p, n);
}

size_t mw_h2mem_stow(mw_h2mem *m, int hpack_dead)
{
    if (!m->region || m->stowed) return 0;
    size_t ps = page_size(), wpp = ps / 8;
    _Static_assert(REGION_PAGES <= 32, "a bit per page in stowed_pages");
    uint32_t pages = 0;
    for (size_t pg = 0; pg < REGION_PAGES; pg++)
        if (stow_page(m, pg)) pages |= (uint32_t)1 << pg;
    tmpl_make(m, pages, hpack_dead);
    const stow_tmpl *t = tmpl_get();
    /* the words to keep: live ones that differ from the prediction; in runs (a header
     * word, then the words), counted first */
    size_t words = 1;
    for (int pass = 0; pass < 2; pass++) {
        uint64_t *copy = NULL;
        if (pass == 1 && !(copy = malloc(words * sizeof *copy))) return 0;
        size_t k = 0, head = 0;
        for (size_t pg = 0; pg < REGION_PAGES; pg++) {
            if (!(pages >> pg & 1)) continue;
            int in_run = 0;
            for (size_t i = pg * wpp; i < (pg + 1) * wpp; i++) {
                int keep = 0;
                uint64_t v = 0;
                if (!dead_word(m, i, hpack_dead)) {
                    v = word_get(m, i);
                    keep = v != predict(m, t, i);
                }
                if (keep && pass == 0) words += in_run ? 1 : 2;
                if (keep && pass == 1) {
                    if (!in_run) {
                        head = k++;
                        copy[head] = (uint64_t)i << 32;
                    }
                    copy[k++] = v;
                    copy[head]++;
                }
                in_run = keep;
            }
        }
        if (pass == 1) {
            copy[k] = 0;
            m->stowed = copy;
        }
    }
    size_t given = 0;
    for (size_t pg = 0; pg < REGION_PAGES; pg++) {
        if (!(pages >> pg & 1)) continue;
        size_t n = 1;                                  /* a row of stowed pages: one call */
        while (pg + n < REGION_PAGES && (pages >> (pg + n) & 1)) n++;
        /* (a page madvise fails on keeps its bytes: the words put back are the same) */
        if (madvise(m->region + pg * ps, n * ps, MADV_DONTNEED) == 0) given += n * ps;
        pg += n - 1;
    }
    for (size_t pg = 0; pg < REGION_PAGES; pg++)
        if (pages >> pg & 1) stow_poison(m, pg, 1);
    m->stowed_pages = pages;
    return given;
}

void mw_h2mem_unstow(mw_h2mem *m)
{
    uint64_t *copy = m->stowed;
    if (!copy) return;
    size_t wpp = page_size() / 8;
    const stow_tmpl *t = tmpl_get();
    for (size_t pg = 0; pg < REGION_PAGES; pg++) {
        if (!(m->stowed_pages >> pg & 1)) continue;
        stow_poison(m, pg, 0);
        /* the prediction first (a page given back reads as zeros: only what is not zero) */
        for (size_t i = pg * wpp; t && i < (pg + 1) * wpp && i < t->n; i++) {
            uint64_t v = predict(m, t, i);
            if (v) word_put(m, i, v);
        }
    }
    for (size_t k = 0; copy[k]; ) {
        size_t at = (size_t)(copy[k] >> 32), n = (size_t)(copy[k] & 0xffffffffu);
        for (size_t j = 0; j < n; j++) word_put(m, at + j, copy[k + 1 + j]);
        k += 1 + n;
    }
    free(copy);
    m->stowed = NULL;
    m->stowed_pages = 0;
}

void mw_h2mem_free(mw_h2mem *m)
{
    mw_h2mem_unstow(m);          /* (its copy; the pages are unmapped next) */
    /* (the shadow of poisoned bytes outlives munmap: the next mapping there must start clean) */
    if (m->area) AREA_UNPOISON(m->area, (size_t)m->ngran * GRAN);
    if (m->region) munmap(m->region, REGION_PAGES * page_size());
    m->region = NULL;
    m->used = m->frame_len = 0;
    m->area = NULL;
    m->ause = m->astart = 0;
}
