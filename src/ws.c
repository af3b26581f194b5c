/* ws: RFC 6455 framing over a stream, and RFC 7692 permessage-deflate. The receive side
 * parses frames straight from the socket's read buffer, incrementally: payload bytes are
 * unmasked (a machine word at a time) and, for text, UTF-8 checked as they arrive, so a bad
 * byte fails at once, even in the middle of a frame. What the peer did wrong comes back as
 * the close code to answer with (1002, 1007, 1009). The send side frames (and masks, for a
 * client) and compresses. The handshake and the connection API live in Lua. */
#define _GNU_SOURCE
#include "ws.h"
#include "stream.h"
#include "uring.h"
#include "mwlua.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <zlib.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#define WS_MT "moonwire.WsConn"
#define RND_SIZE 256

enum { OP_CONT = 0, OP_TEXT = 1, OP_BINARY = 2, OP_CLOSE = 8, OP_PING = 9, OP_PONG = 10 };

typedef struct mw_ws {
    uint64_t magic;             /* WS_MAGIC: see checkws */
    mw_sock *s;
    int client;                 /* we are the client: peer frames unmasked, ours masked */
    uint64_t max_frame, max_message;
    /* permessage-deflate */
    int deflate;
    int rx_reset, tx_reset;     /* no_context_takeover for what we receive / send */
    int rx_bits, tx_bits;
    z_stream *inf, *def;        /* made on first use: most connections never compress */
    /* the frame being parsed */
    int in_frame, fin, opcode, masked;
    uint8_t mask[4];
    uint64_t remaining, mask_off;
    /* the message being assembled */
    int msg_opcode;             /* 0: none, OP_TEXT, OP_BINARY */
    int msg_compressed;
    mw_buf msg;
    uint32_t utf8;              /* incremental UTF-8 state: 0 = between characters */
    uint8_t ctl[125];
    size_t ctl_len;
    /* masking keys (clients only) come from a buffer of getrandom() bytes */
    uint8_t *rnd;
    size_t rnd_left;
} mw_ws;

/* ---- UTF-8 ----------------------------------------------------------------------------- */

/* Checks p[0, n) continuing from *st (0: at a character boundary; else the number of
 * continuation bytes still needed << 16 | lowest << 8 | highest allowed next byte).
 * Returns 0, or -1 at the first byte that cannot be part of well-formed UTF-8. */
static int utf8_check(uint32_t *st, const uint8_t *p, size_t n)
{
    uint32_t s = *st;
    size_t i = 0;
    while (i < n) {
        if (s == 0) {
            while (i + 8 <= n) {  /* ASCII runs a word at a time */
                uint64_t w;
                memcpy(&w, p + i, 8);
                if (w & 0x8080808080808080ULL) break;
                i += 8;
            }
            if (i >= n) break;
            uint8_t c = p[i++];
            if (c < 0x80) continue;
            uint32_t lo = 0x80, hi = 0xBF, need;
            if (c < 0xC2) return -1;
            else if (c < 0xE0) need = 1;
            else if (c < 0xF0) {
                need = 2;
                if (c == 0xE0) lo = 0xA0;       /* no overlong forms */
                if (c == 0xED) hi = 0x9F;       /* no surrogates */
            } else if (c < 0xF5) {
                need = 3;
                if (c == 0xF0) lo = 0x90;
                if (c == 0xF4) hi = 0x8F;       /* nothing above U+10FFFF */
            } else return -1;
            s = need << 16 | lo << 8 | hi;
        } else {
            uint8_t c = p[i++];
            if (c < ((s >> 8) & 0xFF) || c > (s & 0xFF)) return -1;
            uint32_t need = (s >> 16) - 1;
            s = need ? (need << 16 | 0x80 << 8 | 0xBF) : 0;
        }
    }
    *st = s;
    return 0;
}

/* utf8_valid(s) -> boolean (for the Lua layer: close reasons it sends, tests) */
static int l_utf8_valid(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    uint32_t st = 0;
    lua_pushboolean(L, utf8_check(&st, (const uint8_t *)p, n) == 0 && st == 0);
    return 1;
}

/* ---- masking ----------------------------------------------------------------------------- */

static void unmask(uint8_t *p, size_t n, const uint8_t key[4], uint64_t off)
{
    uint8_t k[8];
    for (int i = 0; i < 8; i++) k[i] = key[(off + (uint64_t)i) & 3];
    uint64_t kw;
    memcpy(&kw, k, 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        w ^= kw;
        memcpy(p + i, &w, 8);
    }
    for (; i < n; i++) p[i] ^= key[(off + i) & 3];
}

static int random_fill(uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t r = getrandom(p, n, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* random(n) -> n bytes from the kernel's CSPRNG */
static int l_random(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 0 && n <= 65536, 1, "0..65536 expected");
    luaL_Buffer b;
    uint8_t *p = (uint8_t *)luaL_buffinitsize(L, &b, (size_t)n);
    if (random_fill(p, (size_t)n) < 0) return luaL_error(L, "getrandom failed: %s", strerror(errno));
    luaL_pushresultsize(&b, (size_t)n);
    return 1;
}

/* ws_accept(key) -> the Sec-WebSocket-Accept value for a Sec-WebSocket-Key */
static int l_ws_accept(lua_State *L)
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    size_t n;
    const char *key = luaL_checklstring(L, 1, &n);
    unsigned char md[SHA_DIGEST_LENGTH];
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx) return luaL_error(L, "not enough memory");
    EVP_DigestInit_ex(ctx, EVP_sha1(), NULL);
    EVP_DigestUpdate(ctx, key, n);
    EVP_DigestUpdate(ctx, guid, sizeof guid - 1);
    EVP_DigestFinal_ex(ctx, md, NULL);
    EVP_MD_CTX_free(ctx);
    char out[4 * ((SHA_DIGEST_LENGTH + 2) / 3) + 1];
    int len = EVP_EncodeBlock((unsigned char *)out, md, SHA_DIGEST_LENGTH);
    lua_pushlstring(L, out, (size_t)len);
    return 1;
}

/* ---- receiving ------------------------------------------------------------------------------ */

/* the runtime's buffer pool, for the message buffer (a block per message otherwise) */
static mw_buf_pool *wpool(mw_ws *w) { return w->s ? &w->s->rt->pool : NULL; }

#define WS_MAGIC UINT64_C(0x6d7777736f636b31)   /* "mwwsock1" */

/* every method has the metatable as its upvalue 1 */
static mw_ws *checkws(lua_State *L)
{
    mw_ws *w = mw_udata_magic(L, 1, sizeof(mw_ws), offsetof(mw_ws, magic), WS_MAGIC);
    if (!w) w = mw_checkudata_up(L, 1, 1, WS_MT);
    if (!w->s) luaL_error(L, "attempt to use a closed WebSocket");
    return w;
}

/* nil, message, close code (an integer: what to answer the peer with) */
static int protocol_error(lua_State *L, mw_ws *w, const char *msg, int code)
{
    mw_buf_free(&w->msg, wpool(w));
    w->msg_opcode = 0;
    w->in_frame = 0;
    lua_pushnil(L);
    lua_pushstring(L, msg);
    lua_pushinteger(L, code);
    return 3;
}

static int valid_close_code(int c)
{
    if (c >= 3000 && c <= 4999) return 1;
    return (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014);
}

/* Inflates the finished compressed message into a new string on the stack; 0 or a close
 * code. */
static int inflate_message(lua_State *L, mw_ws *w)
{
    if (!w->inf) {
        w->inf = calloc(1, sizeof *w->inf);
        if (!w->inf) return 1011;
        if (inflateInit2(w->inf, -w->rx_bits) != Z_OK) {
            free(w->inf);
            w->inf = NULL;
            return 1011;
        }
    }
    /* RFC 7692 7.2.2: append the tail the sender removed */
    size_t avail;
    char *tail = mw_buf_reserve(&w->msg, wpool(w), 4, &avail);
    if (!tail) return 1011;
    memcpy(tail, "\x00\x00\xff\xff", 4);
    mw_buf_commit(&w->msg, 4);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    w->inf->next_in = (Bytef *)mw_buf_head(&w->msg);
    w->inf->avail_in = (uInt)mw_buf_len(&w->msg);
    uint64_t total = 0;
    for (;;) {
        char *p = luaL_prepbuffsize(&b, 65536);
        w->inf->next_out = (Bytef *)p;
        w->inf->avail_out = 65536;
        int r = inflate(w->inf, Z_SYNC_FLUSH);
        size_t got = 65536 - w->inf->avail_out;
        luaL_addsize(&b, got);
        total += got;
        if (total > w->max_message) {
            luaL_pushresult(&b);
            lua_pop(L, 1);
            return 1009;  /* a decompression bomb stops here, not after */
        }
        if (r == Z_STREAM_END) {
            /* The peer ended the message with a BFINAL block (RFC 7692 7.2.3.4): zlib takes
             * nothing more on this stream, so it is begun again; with context takeover the
             * next message may still refer back into the window (7.2.2), which is carried
             * over. (Raw inflate takes a dictionary at any time.) */
            Bytef window[1 << 15];
            uInt wlen = 0;
            if (!w->rx_reset) inflateGetDictionary(w->inf, window, &wlen);
            inflateReset(w->inf);
            if (wlen && inflateSetDictionary(w->inf, window, wlen) != Z_OK) {
                luaL_pushresult(&b);
                lua_pop(L, 1);
                return 1011;
            }
            break;
        }
        if (r == Z_BUF_ERROR || (r == Z_OK && w->inf->avail_in == 0 && w->inf->avail_out > 0)) break;
        if (r != Z_OK) {
            luaL_pushresult(&b);
            lua_pop(L, 1);
            return 1007;
        }
    }
    if (w->rx_reset) inflateReset(w->inf);
    luaL_pushresult(&b);
    return 0;
}

static const char *const kinds[] = { "continuation", "text", "binary", "", "", "", "", "",
                                     "close", "ping", "pong" };

/* A whole frame was read: returns the values for Lua, or -1 to go on reading. */
static int frame_done(lua_State *L, mw_ws *w)
{
    w->in_frame = 0;
    int op = w->opcode;
    if (op >= OP_CLOSE) {
        if (op == OP_CLOSE) {
            if (w->ctl_len == 1) return protocol_error(L, w, "close frame with a 1-byte payload", 1002);
            int code = 1005;
            if (w->ctl_len >= 2) {
                code = w->ctl[0] << 8 | w->ctl[1];
                if (!valid_close_code(code)) return protocol_error(L, w, "invalid close code", 1002);
                uint32_t st = 0;
                if (utf8_check(&st, w->ctl + 2, w->ctl_len - 2) < 0 || st != 0)
                    return protocol_error(L, w, "close reason is not valid UTF-8", 1007);
            }
            lua_pushlstring(L, (const char *)w->ctl, w->ctl_len);
            lua_pushstring(L, "close");
            lua_pushinteger(L, code);
            if (w->ctl_len > 2) lua_pushlstring(L, (const char *)w->ctl + 2, w->ctl_len - 2);
            else lua_pushliteral(L, "");
            return 4;
        }
        lua_pushlstring(L, (const char *)w->ctl, w->ctl_len);
        lua_pushstring(L, kinds[op]);
        return 2;
    }
    if (!w->fin) return -1;
    int mop = w->msg_opcode;
    w->msg_opcode = 0;
    if (w->msg_compressed) {
        int code = inflate_message(L, w);
        mw_buf_free(&w->msg, wpool(w));
        if (code == 1009) return protocol_error(L, w, "message too big (after decompression)", 1009);
        if (code) return protocol_error(L, w, "invalid compressed data", code);
        if (mop == OP_TEXT) {
            size_t n;
            const char *p = lua_tolstring(L, -1, &n);
            uint32_t st = 0;
            if (utf8_check(&st, (const uint8_t *)p, n) < 0 || st != 0) {
                lua_pop(L, 1);
                return protocol_error(L, w, "text message is not valid UTF-8", 1007);
            }
        }
    } else {
        if (mop == OP_TEXT && w->utf8 != 0)
            return protocol_error(L, w, "text message ends inside a UTF-8 sequence", 1007);
        if (mw_buf_len(&w->msg) == 0) lua_pushliteral(L, "");
        else lua_pushlstring(L, mw_buf_head(&w->msg), mw_buf_len(&w->msg));
        mw_buf_free(&w->msg, wpool(w));
    }
    if (mop == OP_TEXT || mop == OP_BINARY) lua_pushvalue(L, lua_upvalueindex(mop == OP_TEXT ? 2 : 3));
    else lua_pushstring(L, kinds[mop]);
    return 2;
}

/* Parses a frame header from p[0, len); returns its length, 0 when more bytes are needed,
 * or -code (a close code) with *msg set. */
static int parse_header(mw_ws *w, const uint8_t *p, size_t len, const char **msg)
{
    if (len < 2) return 0;
    int fin = p[0] >> 7, rsv = (p[0] >> 4) & 7, op = p[0] & 15;
    int masked = p[1] >> 7, l7 = p[1] & 127;
    size_t hl = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + (masked ? 4 : 0);
    if (len < hl) return 0;
    uint64_t plen = (uint64_t)l7;
    if (l7 == 126) {
        plen = (uint64_t)p[2] << 8 | p[3];
        if (plen < 126) { *msg = "non-minimal frame length"; return -1002; }
    } else if (l7 == 127) {
        plen = 0;
        for (int i = 0; i < 8; i++) plen = plen << 8 | p[2 + i];
        if (plen >> 63) { *msg = "frame length with the high bit set"; return -1002; }
        if (plen < 65536) { *msg = "non-minimal frame length"; return -1002; }
    }
    if ((op > OP_BINARY && op < OP_CLOSE) || op > OP_PONG) { *msg = "reserved opcode"; return -1002; }
    if (rsv & 3) { *msg = "reserved bits set"; return -1002; }
    int rsv1 = rsv >> 2;
    if (masked == w->client) {
        *msg = w->client ? "masked frame from the server" : "unmasked frame from the client";
        return -1002;
    }
    if (op >= OP_CLOSE) {
        if (!fin) { *msg = "fragmented control frame"; return -1002; }
        if (plen > 125) { *msg = "control frame payload above 125 bytes"; return -1002; }
        if (rsv1) { *msg = "compressed control frame"; return -1002; }
    } else {
        if (op == OP_CONT && !w->msg_opcode) { *msg = "continuation frame without a message"; return -1002; }
        if (op != OP_CONT && w->msg_opcode) { *msg = "new message inside a fragmented message"; return -1002; }
        if (rsv1 && (!w->deflate || op == OP_CONT)) { *msg = "RSV1 set without permessage-deflate"; return -1002; }
        if (plen > w->max_frame) { *msg = "frame too big"; return -1009; }
        if (plen + mw_buf_len(&w->msg) > w->max_message) { *msg = "message too big"; return -1009; }
        if (op != OP_CONT) {
            w->msg_opcode = op;
            w->msg_compressed = rsv1;
            w->utf8 = 0;
        }
    }
    w->fin = fin;
    w->opcode = op;
    w->masked = masked;
    if (masked) memcpy(w->mask, p + hl - 4, 4);
    w->remaining = plen;
    w->mask_off = 0;
    if (op >= OP_CLOSE) w->ctl_len = 0;
    return (int)hl;
}

static int receive_k(lua_State *L, int status, lua_KContext ctx);

/* nowait: return false instead of waiting (the caller watches the socket) */
static int receive_step(lua_State *L, mw_ws *w, mw_task *t, int nowait)
{
    mw_sock *s = w->s;
    for (;;) {
        mw_buf *b = &s->rbuf;
        size_t len = mw_buf_len(b);
        if (!w->in_frame && len > 0) {
            const char *msg = NULL;
            int hl = parse_header(w, (const uint8_t *)mw_buf_head(b), len, &msg);
            if (hl < 0) return protocol_error(L, w, msg, -hl);
            if (hl > 0) {
                mw_buf_consume(b, (size_t)hl);
                w->in_frame = 1;
                if (w->remaining == 0) {
                    int r = frame_done(L, w);
                    if (r >= 0) return mw_sched_checkpoint(L, t, r);
                }
                continue;
            }
        } else if (w->in_frame && len > 0) {
            size_t n = len < w->remaining ? len : (size_t)w->remaining;
            uint8_t *dst;
            if (w->opcode >= OP_CLOSE) {
                dst = w->ctl + w->ctl_len;
                w->ctl_len += n;
            } else {
                size_t avail;
                dst = (uint8_t *)mw_buf_reserve(&w->msg, wpool(w), n, &avail);
                if (!dst) return protocol_error(L, w, "not enough memory", 1011);
                mw_buf_commit(&w->msg, n);
            }
            memcpy(dst, mw_buf_head(b), n);
            mw_buf_consume(b, n);
            if (w->masked) unmask(dst, n, w->mask, w->mask_off);
            w->mask_off += n;
            w->remaining -= n;
            /* fail fast: the first byte that cannot be UTF-8 closes the connection */
            if (w->opcode < OP_CLOSE && w->msg_opcode == OP_TEXT && !w->msg_compressed &&
                utf8_check(&w->utf8, dst, n) < 0)
                return protocol_error(L, w, "text message is not valid UTF-8", 1007);
            if (w->remaining == 0) {
                int r = frame_done(L, w);
                if (r >= 0) return mw_sched_checkpoint(L, t, r);
            }
            continue;
        }
        uint32_t want = EPOLLIN;
        int r = mw_stream_fill(s, 4096, &want);
        if (r == 1) continue;
        if (r == 0) return mw_pushfail(L, "closed", "closed");
        if (r == -3) return mw_stream_pusherr(L, s, errno);
        if (mw_buf_len(b) == 0) mw_buf_release(b, &s->rt->pool);
        if (nowait) {
            lua_pushboolean(L, 0);
            return 1;
        }
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, s->rdeadline, receive_k, 0);
    }
}

static int receive_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_ws *w = lua_touserdata(L, 1);
    mw_task *t = w->s->rt->current;
    int why = mw_sched_reason(t);
    (void)status; (void)ctx;
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (w->s->closed) return mw_pushfail(L, "closed", "closed");
    return receive_step(L, w, t, 0);
}

/* wc:receive_frame([timeout [, nowait]]) -> payload, kind [, code, reason (close)]
 *   | nil, message, closecode (the peer broke the protocol) | nil, message, code (I/O)
 *   | false (nowait, and no whole frame has arrived: watch the socket) */
static int ws_receive(lua_State *L)
{
    mw_ws *w = checkws(L);
    if (w->s->closed) return mw_pushfail(L, "closed", "closed");
    int nowait = lua_toboolean(L, 3);
    int64_t d = mw_sched_deadline(L, w->s->rt, 2, -1);
    mw_task *t = mw_sock_claim(L, w->s, MW_ROLE_READ);
    w->s->rdeadline = d;
    lua_settop(L, 1);
    return receive_step(L, w, t, nowait);
}

/* ---- sending ----------------------------------------------------------------------------- */

/* Writes an unmasked frame header (opcode, fin, rsv1, payload length n) into h; returns its
 * length (2, 4 or 10). */
static size_t head_bytes(uint8_t h[14], lua_Integer op, int fin, int rsv1, size_t n)
{
    h[0] = (uint8_t)((fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0) | op);
    if (n < 126) {
        h[1] = (uint8_t)n;
        return 2;
    }
    if (n < 65536) {
        h[1] = 126;
        h[2] = (uint8_t)(n >> 8);
        h[3] = (uint8_t)n;
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
    return 10;
}

/* Reads a frame's arguments (opcode, payload, fin, rsv1 at 2..5) and writes its header into
 * h; a client's frame gets a fresh masking key, which is also left in *key. Returns the
 * header's length. Both ways out, encode and try_send, frame here. */
/* The head of a frame of n payload bytes into h (masked for a client: *key, else NULL). */
static size_t frame_head_of(lua_State *L, mw_ws *w, uint8_t h[14], int op, int fin, int rsv1, size_t n,
                            uint8_t **key)
{
    size_t hl = head_bytes(h, op, fin, rsv1, n);
    *key = NULL;
    if (!w->client) return hl;
    h[1] |= 0x80;
    if (w->rnd_left < 4) {
        if (!w->rnd && !(w->rnd = malloc(RND_SIZE))) luaL_error(L, "not enough memory");
        if (random_fill(w->rnd, RND_SIZE) < 0) luaL_error(L, "getrandom failed");
        w->rnd_left = RND_SIZE;
    }
    *key = w->rnd + RND_SIZE - w->rnd_left;
    w->rnd_left -= 4;
    memcpy(h + hl, *key, 4);
    return hl + 4;
}

/* frame_head_of with the frame's arguments from the stack: 2 opcode, 3 payload, 4 fin, 5 rsv1 */
static size_t frame_head(lua_State *L, mw_ws *w, uint8_t h[14], const char **payload, size_t *len,
                         uint8_t **key)
{
    lua_Integer op = luaL_checkinteger(L, 2);
    size_t n;
    *payload = luaL_checklstring(L, 3, &n);
    *len = n;
    int fin = lua_isnone(L, 4) ? 1 : lua_toboolean(L, 4);
    int rsv1 = lua_toboolean(L, 5);
    luaL_argcheck(L, op >= 0 && op <= 15, 2, "opcode out of range");
    if (op >= OP_CLOSE && n > 125) luaL_argerror(L, 3, "control frame payload above 125 bytes");
    return frame_head_of(L, w, h, (int)op, fin, rsv1, n, key);
}

/* A client's payload, masked: a copy pushed on the stack (it stays valid while there) */
static const char *masked_copy(lua_State *L, const char *payload, size_t n, const uint8_t *key)
{
    luaL_Buffer b;
    uint8_t *out = (uint8_t *)luaL_buffinitsize(L, &b, n);
    memcpy(out, payload, n);
    unmask(out, n, key, 0);
    luaL_pushresultsize(&b, n);
    return lua_tostring(L, -1);
}

/* wc:encode(opcode, payload, fin, rsv1) -> header, payload: the frame as two strings to
 * write together; a client's payload comes back masked (a copy), a server's as it was. */
static int ws_encode(lua_State *L)
{
    mw_ws *w = checkws(L);
    uint8_t h[14], *key;
    const char *payload;
    size_t n, hl = frame_head(L, w, h, &payload, &n, &key);
    lua_pushlstring(L, (const char *)h, hl);
    if (!key) {
        lua_pushvalue(L, 3);
        return 2;
    }
    masked_copy(L, payload, n, key);
    return 2;
}

/* The one way a frame goes out at once, for try_send and send_all: one write of iov (what
 * the stream gathered first), no wait. Returns the bytes the socket took (0: it is full), or
 * -1 with errno set. */
static ssize_t write_now(mw_sock *s, const struct iovec *iov, int cnt)
{
    uint32_t want = 0;
    for (;;) {
        ssize_t r = mw_sock_writev(s, iov, cnt, &want);
        if (r >= 0) return r;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        return -1;
    }
}

/* What write_now left of a frame (header a[0, an), payload b[0, bn), `sent` bytes gone):
 * pushes false and the unsent bytes; returns 2. */
static int push_rest(lua_State *L, const char *a, size_t an, const char *b, size_t bn, size_t sent)
{
    lua_pushboolean(L, 0);
    luaL_Buffer rest;
    char *out = luaL_buffinitsize(L, &rest, an + bn - sent);
    size_t arest = sent < an ? an - sent : 0;
    memcpy(out, a + (an - arest), arest);
    memcpy(out + arest, b + (sent - (an - arest)), bn - (sent - (an - arest)));
    luaL_pushresultsize(&rest, an + bn - sent);
    return 2;
}

/* Frames up to this size go out as one buffer (header and payload copied together): one
 * iovec, which the plain transport sends with send(2) rather than sendmsg(2). */
#define CONTIG_MAX 512

/* wc:try_send(opcode, payload, fin, rsv1) -> true (the whole frame went out now)
 *   | false, rest (only part of it did, or none: `rest` is the frame's unsent bytes, which the
 *     caller writes before any other frame) | nil, err, code.
 * The way every frame of a connection whose writer slot is free goes out: no Lua string for
 * the header, one write, no wait. Raises, as a socket's write does, when another task is
 * writing on the socket. */
/* try_send's work: the frame (h, hl; a client's payload masked first) written now as far as
 * the socket takes it; pushes true, or false and the unsent bytes, or nil, err, code. */
static int send_now(lua_State *L, mw_ws *w, const uint8_t *h, size_t hl, const char *payload, size_t n,
                    const uint8_t *key)
{
    mw_sock *s = w->s;
    if (key) payload = masked_copy(L, payload, n, key);
    char one[CONTIG_MAX];
    struct iovec iov[2] = { { (void *)h, hl }, { (void *)payload, n } };
    int cnt = n ? 2 : 1;
    if (hl + n <= sizeof one) {
        memcpy(one, h, hl);
        memcpy(one + hl, payload, n);
        iov[0].iov_base = one;
        iov[0].iov_len = hl + n;
        cnt = 1;
    }
    ssize_t r = write_now(s, iov, cnt);
    if (r < 0) return mw_stream_pusherr(L, s, errno);
    if ((size_t)r == hl + n) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return push_rest(L, (const char *)h, hl, payload, n, (size_t)r);
}

static int ws_try_send(lua_State *L)
{
    mw_ws *w = checkws(L);
    mw_sock *s = w->s;
    if (s->closed) return mw_pushfail(L, "closed", "closed");
    if (s->waiter[MW_ROLE_WRITE]) return luaL_error(L, "socket already has a writing task");
    uint8_t h[14], *key;
    const char *payload;
    size_t n, hl = frame_head(L, w, h, &payload, &n, &key);
    return send_now(L, w, h, hl, payload, n, key);
}

/* ws:send(data [, kind]) for websocket.lua's WebSocket, its common case here: a whole
 * message written at once when nobody writes, nothing to fragment, nothing to compress
 * (try_send, as the Lua send's own first step). A task sending from its handler's frame then
 * adds no Lua frame, so its stack stays as small as its receive left it (a Lua stack never
 * shrinks back while its task waits: docs/websocket.md). The rest (other kinds, invalid
 * UTF-8, a closed or busy connection, fragment_size or idle_timeout set, a message to
 * compress) goes to the Lua send, and what the socket did not take to its sent_part;
 * ws_send_spec runs the same cases through both. Upvalues: see WSU_*. */
enum { WSU_SLOW = 1, WSU_PART, WSU_TEXT, WSU_BINARY, WSU_STATE, WSU_OPEN, WSU_WRITER, WSU_TUNED,
       WSU_DEFLATE, WSU_WC, WSU_COUNT = WSU_WC };

static int ws_send_c(lua_State *L)
{
    int top = lua_gettop(L);
    if (top < 2 || top > 3 || lua_type(L, 1) != LUA_TTABLE || lua_type(L, 2) != LUA_TSTRING) return mw_call_upvalue(L, WSU_SLOW, top);
    int op = OP_TEXT;
    if (top == 3 && !lua_isnil(L, 3)) {
        if (lua_rawequal(L, 3, lua_upvalueindex(WSU_BINARY))) op = OP_BINARY;
        else if (!lua_rawequal(L, 3, lua_upvalueindex(WSU_TEXT))) return mw_call_upvalue(L, WSU_SLOW, top);
    }
    size_t n;
    const char *d = lua_tolstring(L, 2, &n);
    if (op == OP_TEXT) {
        uint32_t st = 0;
        if (utf8_check(&st, (const uint8_t *)d, n) < 0 || st != 0) return mw_call_upvalue(L, WSU_SLOW, top);
    }
    lua_settop(L, 3);
    mw_rawget_upvalue(L, 1, WSU_STATE);
    if (!lua_rawequal(L, -1, lua_upvalueindex(WSU_OPEN))) return mw_call_upvalue(L, WSU_SLOW, top);
    if (mw_rawget_upvalue(L, 1, WSU_WRITER) != LUA_TNIL && lua_toboolean(L, -1)) return mw_call_upvalue(L, WSU_SLOW, top);
    if (mw_rawget_upvalue(L, 1, WSU_TUNED) != LUA_TNIL && lua_toboolean(L, -1)) return mw_call_upvalue(L, WSU_SLOW, top);
    if (mw_rawget_upvalue(L, 1, WSU_DEFLATE) != LUA_TNIL && lua_toboolean(L, -1)) {
        int isnum;
        lua_getfield(L, 1, "deflate_threshold");
        lua_Number t = lua_tonumberx(L, -1, &isnum);
        if (!isnum || (lua_Number)n >= t) return mw_call_upvalue(L, WSU_SLOW, top);
    }
    mw_rawget_upvalue(L, 1, WSU_WC);
    mw_ws *w = mw_udata_magic(L, -1, sizeof(mw_ws), offsetof(mw_ws, magic), WS_MAGIC);
    if (!w || !w->s || w->s->closed || w->s->waiter[MW_ROLE_WRITE]) return mw_call_upvalue(L, WSU_SLOW, top);
    /* (no nested C call: a C function's frame takes LUA_MINSTACK slots, which would grow
     * the task's stack) */
    lua_settop(L, 3);
    uint8_t h[14], *key;
    size_t hl = frame_head_of(L, w, h, op, 1, 0, n, &key);
    int r = send_now(L, w, h, hl, d, n, key);
    if (r == 1) return 1;                                   /* true: all of it went */
    /* sent_part(self, done, rest [, code]): queues what is left, or fails the connection
     * (send_now's results are the top r values: a client's masked copy sits below them) */
    int first = lua_gettop(L) - r + 1;
    lua_pushvalue(L, lua_upvalueindex(WSU_PART));
    lua_pushvalue(L, 1);
    lua_rotate(L, first, 2);
    lua_callk(L, r + 1, LUA_MULTRET, first - 1, mw_results_k);
    return mw_results_k(L, LUA_OK, first - 1);
}

/* ws_send(send_lua, sent_part) -> ws:send with its common case in C */
static int l_ws_send(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_pushliteral(L, "text");
    lua_pushliteral(L, "binary");
    lua_pushliteral(L, "state");
    lua_pushliteral(L, "open");
    lua_pushliteral(L, "_writer");
    lua_pushliteral(L, "_tuned");
    lua_pushliteral(L, "_deflate");
    lua_pushliteral(L, "wc");
    lua_pushcclosure(L, ws_send_c, WSU_COUNT);
    return 1;
}

/* ws_frame(opcode, payload) -> a whole unmasked frame (fin set, no rsv1) as one string: a
 * broadcast's bytes for every server-side member (ws_send_all) and every queue. */
static int l_ws_frame(lua_State *L)
{
    lua_Integer op = luaL_checkinteger(L, 1);
    size_t n;
    const char *payload = luaL_checklstring(L, 2, &n);
    luaL_argcheck(L, op >= 0 && op <= 15, 1, "opcode out of range");
    if (op >= OP_CLOSE && n > 125) luaL_argerror(L, 2, "control frame payload above 125 bytes");
    uint8_t h[14];
    size_t hl = head_bytes(h, op, 1, 0, n);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, hl + n);
    memcpy(out, h, hl);
    memcpy(out + hl, payload, n);
    luaL_pushresultsize(&b, hl + n);
    return 1;
}

/* A batch of members whose frame goes out as it is, and what came of it */
typedef struct {
    int n;
    int fd[MW_URING_BATCH];
    mw_sock *s[MW_URING_BATCH];
    lua_Integer at[MW_URING_BATCH];     /* the member's index in the list */
    ssize_t res[MW_URING_BATCH];        /* bytes taken, or -errno */
} send_batch;

/* ws_send_all's stack: 1 list, 2 frame, 3 len, 4-9 field names, 10 `left` (or nil), 11 a member */
enum { SA_LIST = 1, SA_STATE = 4, SA_OPEN, SA_WRITER, SA_DEFLATE, SA_WC, SA_THRESHOLD, SA_LEFT, SA_MEMBER };

/* Appends (list[at], how, rest) to `left`, made on first use. */
static void leave_to_lua(lua_State *L, lua_Integer at, int how, const char *rest, size_t n)
{
    if (lua_isnil(L, SA_LEFT)) {
        lua_createtable(L, 6, 0);
        lua_replace(L, SA_LEFT);
    }
    lua_Integer k = (lua_Integer)lua_rawlen(L, SA_LEFT);
    lua_rawgeti(L, SA_LIST, at);
    lua_rawseti(L, SA_LEFT, k + 1);
    lua_pushinteger(L, how);
    lua_rawseti(L, SA_LEFT, k + 2);
    if (rest) lua_pushlstring(L, rest, n);
    else lua_pushboolean(L, 0);
    lua_rawseti(L, SA_LEFT, k + 3);
}

/* Sends the batch's frame: through io_uring where it works, the rest (or all) as try_send
 * sends (write_now); then settles each member: took it all (counted), part (left: 1 and the
 * unsent bytes), failed (left: 2). */
static void flush_batch(lua_State *L, mw_uring *u, send_batch *b, const char *frame, size_t fl, lua_Integer *sent)
{
    int k = mw_uring_send_many(u, b->fd, b->n, frame, fl, b->res);
    for (int i = k; i < b->n; i++) {
        struct iovec iov = { (void *)frame, fl };
        ssize_t r = write_now(b->s[i], &iov, 1);
        b->res[i] = r < 0 ? -errno : r;
    }
    for (int i = 0; i < b->n; i++) {
        ssize_t r = b->res[i];
        if (r == (ssize_t)fl) (*sent)++;
        else if (r >= 0 || r == -EAGAIN || r == -EWOULDBLOCK || r == -EINTR) {
            size_t took = r > 0 ? (size_t)r : 0;
            leave_to_lua(L, b->at[i], 1, frame + took, fl - took);
        } else {
            leave_to_lua(L, b->at[i], 2, NULL, 0);
        }
    }
    b->n = 0;
}

/* ws_send_all(list, frame, len) -> sent, left | nil
 * A broadcast's walk over its members list[1], list[2], ... up to the first nil, as ipairs
 * goes (WebSocket tables): frame is the whole message as ws_frame made it, len the message's
 * length (for deflate_threshold). Members whose state is not "open" are skipped. A member
 * whose frame can go out as it is, at once (a server-side connection, nobody writing on it,
 * not compressing this message) gets it: plain sockets with nothing gathered in batches
 * through io_uring (uring.c), the others, and all where io_uring does not work, through
 * write_now, as try_send sends; sent counts those that took all of it. The other members
 * come back in `left` as triples (member, how, rest):
 *   how 0  another case (a writer busy, deflate, a client, a closed socket, not a
 *          WebSocket): nothing was written, the caller's general path handles it;
 *   how 1  the member took only part of the frame: rest is what it did not take;
 *   how 2  writing to the member failed.
 * No Lua code runs in here, so the list does not change during the walk; the caller
 * handles `left` after it (closing a member may change the list). */
static int l_ws_send_all(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    size_t fl;
    const char *frame = luaL_checklstring(L, 2, &fl);
    lua_Integer len = luaL_checkinteger(L, 3);
    mw_uring *u = lua_touserdata(L, lua_upvalueindex(1));
    send_batch batch, *b = &batch;
    b->n = 0;
    lua_settop(L, 3);
    lua_pushliteral(L, "state");
    lua_pushliteral(L, "open");
    lua_pushliteral(L, "_writer");
    lua_pushliteral(L, "_deflate");
    lua_pushliteral(L, "wc");
    lua_pushliteral(L, "deflate_threshold");
    lua_pushnil(L);                             /* SA_LEFT */
    lua_Integer sent = 0;
    for (lua_Integer i = 1;; i++, lua_settop(L, SA_LEFT)) {
        int t = lua_rawgeti(L, SA_LIST, i);
        if (t == LUA_TNIL) break;
        if (t != LUA_TTABLE) goto other;
        lua_pushvalue(L, SA_STATE);
        lua_rawget(L, SA_MEMBER);
        if (!lua_rawequal(L, -1, SA_OPEN)) continue;
        lua_pushvalue(L, SA_WRITER);
        lua_rawget(L, SA_MEMBER);
        if (lua_toboolean(L, -1)) goto other;
        lua_pushvalue(L, SA_DEFLATE);
        lua_rawget(L, SA_MEMBER);
        if (lua_toboolean(L, -1)) {
            /* deflate negotiated: compressed (the general path) from the threshold on */
            int isint;
            lua_pushvalue(L, SA_THRESHOLD);
            lua_gettable(L, SA_MEMBER);
            lua_Integer threshold = lua_tointegerx(L, -1, &isint);
            if (!isint || len >= threshold) goto other;
        }
        lua_pushvalue(L, SA_WC);
        lua_rawget(L, SA_MEMBER);
        mw_ws *w = mw_udata_magic(L, -1, sizeof(mw_ws), offsetof(mw_ws, magic), WS_MAGIC);
        if (!w || !w->s || w->client || w->s->closed || w->s->waiter[MW_ROLE_WRITE]) goto other;
        if (w->s->tp == &mw_plain_transport && mw_buf_len(&w->s->obuf) == 0) {
            b->fd[b->n] = w->s->io.fd;
            b->s[b->n] = w->s;
            b->at[b->n] = i;
            if (++b->n == MW_URING_BATCH) flush_batch(L, u, b, frame, fl, &sent);
            continue;
        }
        struct iovec iov = { (void *)frame, fl };
        ssize_t r = write_now(w->s, &iov, 1);
        if ((size_t)r == fl) sent++;
        else if (r >= 0) leave_to_lua(L, i, 1, frame + r, fl - (size_t)r);
        else leave_to_lua(L, i, 2, NULL, 0);
        continue;
    other:
        leave_to_lua(L, i, 0, NULL, 0);
    }
    if (b->n) flush_batch(L, u, b, frame, fl, &sent);
    lua_pushinteger(L, sent);
    lua_pushvalue(L, SA_LEFT);
    return 2;
}

/* ws_uring([on]) -> on, made: broadcast's use of io_uring (tests run both ways: `on` turns it
 * on or off, and the result is what it was), and whether this Lua state's ring (one
 * descriptor, kept once made) exists. */
static int l_ws_uring(lua_State *L)
{
    mw_uring *u = lua_touserdata(L, lua_upvalueindex(1));
    int made = mw_uring_made(u);
    int was = lua_isnoneornil(L, 1) ? mw_uring_enable(u, -1) : mw_uring_enable(u, lua_toboolean(L, 1));
    lua_pushboolean(L, was);
    lua_pushboolean(L, made);
    return 2;
}

/* wc:deflate(payload) -> the compressed payload of one message (RFC 7692: sync flush,
 * the final 00 00 ff ff removed; the context reset afterwards when not taken over) */
static int ws_deflate(lua_State *L)
{
    mw_ws *w = checkws(L);
    size_t n;
    const char *in = luaL_checklstring(L, 2, &n);
    if (!w->deflate) return luaL_error(L, "permessage-deflate was not negotiated");
    if (!w->def) {
        w->def = calloc(1, sizeof *w->def);
        if (!w->def) return luaL_error(L, "not enough memory");
        /* zlib's deflate makes a raw 8-bit window a 9-bit one, yet a peer that asked for 8 can
         * inflate what it writes: its matches reach at most w_size - MIN_LOOKAHEAD (512 - 262
         * = 250) bytes back (deflate.h MAX_DIST), within 256. (ws_client_conformance_spec
         * checks this with an 8-bit inflater fed a byte at a time.) */
        int bits = w->tx_bits < 9 ? 9 : w->tx_bits;
        if (deflateInit2(w->def, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -bits, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
            free(w->def);
            w->def = NULL;
            return luaL_error(L, "deflateInit2 failed");
        }
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    w->def->next_in = (Bytef *)in;
    w->def->avail_in = (uInt)n;
    do {
        char *p = luaL_prepbuffsize(&b, 16384);
        w->def->next_out = (Bytef *)p;
        w->def->avail_out = 16384;
        if (deflate(w->def, Z_SYNC_FLUSH) == Z_STREAM_ERROR) return luaL_error(L, "deflate failed");
        luaL_addsize(&b, 16384 - w->def->avail_out);
    } while (w->def->avail_out == 0);
    if (w->tx_reset) deflateReset(w->def);
    luaL_pushresult(&b);
    size_t len;
    const char *out = lua_tolstring(L, -1, &len);
    if (len >= 4 && memcmp(out + len - 4, "\x00\x00\xff\xff", 4) == 0) len -= 4;
    /* RFC 7692 7.2.1: what is left must not be empty; an empty stored block is one 0x00 */
    if (len == 0) lua_pushlstring(L, "\0", 1);
    else lua_pushlstring(L, out, len);
    return 1;
}

/* ---- the object -------------------------------------------------------------------------- */

static int ws_gc(lua_State *L)
{
    mw_ws *w = luaL_checkudata(L, 1, WS_MT);
    if (w->inf) { inflateEnd(w->inf); free(w->inf); w->inf = NULL; }
    if (w->def) { deflateEnd(w->def); free(w->def); w->def = NULL; }
    free(w->rnd);
    w->rnd = NULL;
    mw_buf_free(&w->msg, NULL);
    w->s = NULL;
    return 0;
}

static uint64_t opt_u64(lua_State *L, int t, const char *k, uint64_t dflt)
{
    uint64_t v = dflt;
    if (lua_getfield(L, t, k) != LUA_TNIL) {
        lua_Integer n = lua_tointeger(L, -1);
        if (n <= 0) luaL_error(L, "bad option '%s' (positive integer expected)", k);
        v = (uint64_t)n;
    }
    lua_pop(L, 1);
    return v;
}

/* ws_conn(sock, opts) -> wc; opts: client, max_frame, max_message, deflate (table:
 * rx_bits, tx_bits, rx_no_context_takeover, tx_no_context_takeover) */
static int l_ws_conn(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    mw_ws *w = lua_newuserdatauv(L, sizeof *w, 1);
    memset(w, 0, sizeof *w);
    w->magic = WS_MAGIC;
    luaL_setmetatable(L, WS_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    lua_getfield(L, 2, "client");
    w->client = lua_toboolean(L, -1);
    lua_pop(L, 1);
    w->max_message = opt_u64(L, 2, "max_message", 16 * 1024 * 1024);
    w->max_frame = opt_u64(L, 2, "max_frame", w->max_message);
    if (lua_getfield(L, 2, "deflate") == LUA_TTABLE) {
        w->deflate = 1;
        w->rx_bits = (int)opt_u64(L, -1, "rx_bits", 15);
        w->tx_bits = (int)opt_u64(L, -1, "tx_bits", 15);
        if (w->rx_bits < 8 || w->rx_bits > 15 || w->tx_bits < 8 || w->tx_bits > 15)
            return luaL_error(L, "bad deflate window bits");
        lua_getfield(L, -1, "rx_no_context_takeover");
        w->rx_reset = lua_toboolean(L, -1);
        lua_getfield(L, -2, "tx_no_context_takeover");
        w->tx_reset = lua_toboolean(L, -1);
        lua_pop(L, 2);
    }
    lua_pop(L, 1);
    w->s = s;
    return 1;
}

void mw_ws_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "receive_frame", ws_receive }, { "encode", ws_encode }, { "deflate", ws_deflate },
        { "try_send", ws_try_send },
        { NULL, NULL }
    };
    if (luaL_newmetatable(L, WS_MT)) {
        luaL_newlibtable(L, methods);
        lua_pushvalue(L, -2);
        lua_pushliteral(L, "text");
        lua_pushliteral(L, "binary");
        luaL_setfuncs(L, methods, 3);     /* upvalues: metatable, "text", "binary" */
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, ws_gc);
        lua_setfield(L, -2, "__gc");
    }
    /* the methods also as a table: websocket.lua calls the per-frame ones as plain
     * functions, without looking them up through the connection's metatable each time */
    lua_getfield(L, -1, "__index");
    lua_setfield(L, -3, "ws_methods");
    lua_pop(L, 1);
    static const luaL_Reg f[] = {
        { "ws_conn", l_ws_conn }, { "ws_accept", l_ws_accept }, { "random", l_random },
        { "utf8_valid", l_utf8_valid }, { "ws_frame", l_ws_frame }, { "ws_send", l_ws_send }, { NULL, NULL }
    };
    luaL_setfuncs(L, f, 0);
    /* broadcast's walk and its switch share one io_uring holder (made on first use) */
    mw_uring_push(L);
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, l_ws_send_all, 1);
    lua_setfield(L, -3, "ws_send_all");
    lua_pushcclosure(L, l_ws_uring, 1);
    lua_setfield(L, -2, "ws_uring");
}
