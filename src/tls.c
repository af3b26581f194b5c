/* tls: OpenSSL under the stream layer. A context (moonwire.TlsContext) holds an SSL_CTX
 * configured from Lua options; a socket gets a TLS session by starttls (or by accept on a
 * TLS listener) and from then on reads and writes through the TLS transport below, so read,
 * write, accept and everything above (HTTP, WebSocket) work unchanged. WANT_READ/WANT_WRITE
 * become EAGAIN with the readiness to wait for. Secure by default: TLS 1.2+, clients verify
 * the chain and the host name against the system CA store. */
#define _GNU_SOURCE
#include "tls.h"
#include "stream.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <strings.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define CTX_MT "moonwire.TlsContext"
#define SESS_SLOTS 32

typedef struct mw_tlsctx {
    SSL_CTX *ctx;
    int server;
    int insecure;
    unsigned char *alpn;        /* wire format, for the server's selection */
    unsigned int alpn_len;
    /* SNI: extra contexts by host name, a Lua table in user value 1 (name -> TlsContext) */
    int has_sni;
    lua_State *L;               /* only used inside the SNI callback (no Lua calls there) */
    SSL_CTX **sni_ctx;
    char **sni_name;
    char **sni_files;           /* 2 per entry: its cert and key files (NULL, NULL: PEM text) */
    int nsni;
    /* what reload() re-reads */
    char *cert_file, *key_file;
    /* a client context's sessions to resume, by "host:port" (the name verified, the peer's
     * port): a new connection to the same server skips the full handshake. A slot is
     * replaced by a newer session of its key, or round-robin when all are taken. */
    struct { char *key; SSL_SESSION *sess; } sessions[SESS_SLOTS];
    int sess_next;
} mw_tlsctx;

typedef struct mw_tlsconn {
    SSL *ssl;
    mw_tlsctx *t;              /* a client's context (sessions), kept alive by the socket */
    char *sess_key;            /* its sessions' key, or NULL: none cached */
    int handshake_done;
    int unclean_eof;            /* the stream ended without the peer's close_notify (mw_tls_truncated) */
    /* a record SSL_write made and sent only in part (WANT_WRITE): its bytes, which the next
     * write must begin with (tls_writev); wbroken: one began with other bytes */
    unsigned char *wpend;
    size_t wpend_len;
    int wbroken;
    pid_t pid;                  /* the process that made the session (see tls_close) */
    char err[256];
} mw_tlsconn;

/* ---- errors ----------------------------------------------------------------------------------- */

/* The reason of the latest OpenSSL error (and the verification result) into buf. */
static void tls_reason(SSL *ssl, char *buf, size_t n)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    long vr = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    if (vr != X509_V_OK && e && ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED)
        snprintf(buf, n, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
    else if (r)
        snprintf(buf, n, "%s", r);
    else
        snprintf(buf, n, "TLS error");
    ERR_clear_error();
}

/* ---- the socket BIO ------------------------------------------------------------------------ */

/* OpenSSL reads and writes the socket through this BIO rather than its own socket BIO, so
 * TLS shares the plain transport's drained-socket bookkeeping (mw_sock.rready): a record read
 * short leaves the socket drained and the next SSL_read waits for the event instead of
 * asking the kernel for an EAGAIN. */
static BIO_METHOD *sock_bio_method;
static pthread_once_t sock_bio_once = PTHREAD_ONCE_INIT;

static int sbio_read(BIO *b, char *buf, int len)
{
    BIO_clear_retry_flags(b);
    ssize_t n = mw_sock_recv(BIO_get_data(b), buf, (size_t)len);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(b);
    return (int)n;
}

static int sbio_write(BIO *b, const char *buf, int len)
{
    mw_sock *s = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    ssize_t n = send(s->io.fd, buf, (size_t)len, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(b);
    return (int)n;
}

static long sbio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)b; (void)num; (void)ptr;
    return cmd == BIO_CTRL_FLUSH || cmd == BIO_CTRL_DUP;
}

static int sbio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static void sock_bio_setup(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "moonwire socket");
    if (m && BIO_meth_set_read(m, sbio_read) && BIO_meth_set_write(m, sbio_write) &&
        BIO_meth_set_ctrl(m, sbio_ctrl) && BIO_meth_set_create(m, sbio_create))
        sock_bio_method = m;
    else if (m)
        BIO_meth_free(m);
}

/* A BIO over the socket's descriptor, or NULL. */
static BIO *sock_bio(mw_sock *s)
{
    pthread_once(&sock_bio_once, sock_bio_setup);
    if (!sock_bio_method) return NULL;
    BIO *b = BIO_new(sock_bio_method);
    if (b) BIO_set_data(b, s);
    return b;
}

/* ---- the transport ------------------------------------------------------------------------- */

/* SSL_get_error needs an empty error queue; it is nearly always empty already */
static inline void clear_errors(void)
{
    if (ERR_peek_error()) ERR_clear_error();
}

/* Maps an SSL_get_error result to our transport contract. */
static ssize_t ssl_result(mw_sock *s, mw_tlsconn *c, int r, uint32_t *want)
{
    int e = SSL_get_error(c->ssl, r);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        *want = EPOLLIN;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_WANT_WRITE:
        *want = EPOLLOUT;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN:
        return 0;                       /* close_notify */
    case SSL_ERROR_SYSCALL:
        ERR_clear_error();
        if (errno == 0 || errno == EAGAIN) {
            c->unclean_eof = 1;         /* the peer closed without close_notify */
            return 0;
        }
        return -1;
    default: {
        unsigned long last = ERR_peek_last_error();
        if (ERR_GET_LIB(last) == ERR_LIB_SSL && ERR_GET_REASON(last) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            /* the same bare end, as OpenSSL reports it when its BIO says EOF */
            ERR_clear_error();
            c->unclean_eof = 1;
            return 0;
        }
        tls_reason(c->ssl, c->err, sizeof c->err);
        errno = EPROTO;
        (void)s;
        return -1;
    }
    }
}

static ssize_t tls_read(mw_sock *s, char *buf, size_t len, uint32_t *want)
{
    mw_tlsconn *c = s->tls;
    if (!s->rready && (c->handshake_done || SSL_is_init_finished(c->ssl)) && !SSL_has_pending(c->ssl)) {
        /* the socket is drained and OpenSSL holds no bytes: nothing to decrypt until the
         * next readable event (a short cut past SSL_read's state machine) */
        *want = EPOLLIN;
        errno = EAGAIN;
        return -1;
    }
    clear_errors();
    errno = 0;
    int r = SSL_read(c->ssl, buf, len > 0x7fffffff ? 0x7fffffff : (int)len);
    if (r > 0) return r;
    return ssl_result(s, c, r, want);
}

/* On WANT_WRITE (EAGAIN to the caller: nothing written), SSL_write has already made its
 * record from the bytes offered and sent part of it, maybe none; OpenSSL's retry sends the
 * rest and counts as many of the bytes then offered as written, whatever they are. A caller
 * that waits and writes on offers the same bytes again (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER:
 * maybe from elsewhere); one that gave up (a write "timeout") and then writes other bytes
 * would have the peer receive the old record in their place. So a call offers one record at
 * most (16 KiB: then the record is exactly the bytes offered, none of it reported written),
 * keeps a copy of it on WANT_WRITE, and a later call that does not begin with those bytes
 * fails, as every write after it does: the stream cannot go on without a hole or a splice. */
static ssize_t write_broken(mw_tlsconn *c)
{
    c->wbroken = 1;
    snprintf(c->err, sizeof c->err, "a write given up in the middle of a record was followed by other bytes");
    errno = EPROTO;
    return -1;
}

static ssize_t tls_writev(mw_sock *s, const struct iovec *iov, int n, uint32_t *want)
{
    mw_tlsconn *c = s->tls;
    if (c->wbroken) return write_broken(c);
    /* one record: small pieces coalesced, up to 16 KiB */
    char buf[16384];
    const char *p = iov[0].iov_base;
    size_t len = iov[0].iov_len;
    if (n > 1 && len < sizeof buf) {
        len = 0;
        for (int i = 0; i < n && len < sizeof buf; i++) {
            size_t k = iov[i].iov_len;
            if (k > sizeof buf - len) k = sizeof buf - len;
            memcpy(buf + len, iov[i].iov_base, k);
            len += k;
        }
        p = buf;
    }
    if (len > sizeof buf) len = sizeof buf;
    if (len == 0) return 0;
    if (c->wpend_len && (len < c->wpend_len || memcmp(p, c->wpend, c->wpend_len) != 0)) return write_broken(c);
    clear_errors();
    errno = 0;
    int r = SSL_write(c->ssl, p, (int)len);
    if (r > 0) {
        c->wpend_len = 0;
        return r;
    }
    ssize_t x = ssl_result(s, c, r, want);
    if (x < 0 && errno == EAGAIN && !c->wpend_len) {
        if (!c->wpend) c->wpend = malloc(sizeof buf);
        if (!c->wpend) {
            c->wbroken = 1;            /* (no copy: a retry could not be checked) */
            snprintf(c->err, sizeof c->err, "not enough memory");
            errno = EPROTO;
            return -1;
        }
        memcpy(c->wpend, p, len);
        c->wpend_len = len;
    }
    if (x == 0) {
        /* "closed" (the peer's close_notify came in, or a bare EOF) is an end for a read;
         * for a write that moved nothing it must be an error, or the caller's write loop
         * takes 0 bytes for progress and spins */
        errno = EPIPE;
        return -1;
    }
    return x;
}

/* Sends close_notify (best effort, never waits) once the handshake is done. Handshakes
 * driven by SSL_read/SSL_write (accepted, deferred) never set the flag. A forked child
 * closing a session it inherited (its tasks are ended at fork, their <close> variables run)
 * sends none: the connection is still the parent's, and a close_notify from here would end
 * it for the peer. Reading goes on after it (the peer's half stays open). */
static void tls_notify_close(mw_sock *s)
{
    mw_tlsconn *c = s->tls;
    if (!c) return;
    if ((c->handshake_done || SSL_is_init_finished(c->ssl)) && s->io.fd >= 0 && c->pid == getpid() &&
        !(SSL_get_shutdown(c->ssl) & SSL_SENT_SHUTDOWN)) {
        ERR_clear_error();
        SSL_shutdown(c->ssl);
        ERR_clear_error();
    }
}

static void tls_close(mw_sock *s)
{
    mw_tlsconn *c = s->tls;
    if (!c) return;
    tls_notify_close(s);
    SSL_free(c->ssl);
    free(c->sess_key);
    free(c->wpend);
    free(c);
    s->tls = NULL;
}

int mw_tls_truncated(const mw_sock *s)
{
    const mw_tlsconn *c = s->tls;
    return c && c->unclean_eof;
}

/* decrypted bytes not yet read, or 1 for records read from the fd and not yet decrypted */
static int tls_pending(mw_sock *s)
{
    mw_tlsconn *c = s->tls;
    if (!c) return 0;
    int n = SSL_pending(c->ssl);
    return n > 0 ? n : SSL_has_pending(c->ssl);
}

static const char *tls_errmsg(mw_sock *s)
{
    mw_tlsconn *c = s->tls;
    return c && c->err[0] ? c->err : "TLS error";
}

/* SSL_MODE_RELEASE_BUFFERS (the context's default) frees the record buffers (16 KiB and more
 * each way) after every SSL_read and SSL_write: an idle connection costs none, a busy one a
 * malloc and a free per record. A busy protocol (HTTP/2) holds them and gives them back when
 * it has been idle a while. SSL_free_buffers declines while a record is partly read or
 * written; it is only asked when OpenSSL holds no bytes. */
static void tls_trim(mw_sock *s, int hold)
{
    mw_tlsconn *c = s->tls;
    if (!c) return;
    if (!SSL_has_pending(c->ssl) && SSL_want(c->ssl) == SSL_NOTHING) SSL_free_buffers(c->ssl);
    if (hold) SSL_clear_mode(c->ssl, SSL_MODE_RELEASE_BUFFERS);
    else SSL_set_mode(c->ssl, SSL_MODE_RELEASE_BUFFERS);
}

static const mw_transport mw_tls_transport = { tls_read, tls_writev, tls_close, tls_pending, tls_errmsg, tls_trim,
                                               tls_notify_close };

/* ---- contexts -------------------------------------------------------------------------------- */

static int alpn_wire(lua_State *L, int t, unsigned char **out, unsigned int *outlen)
{
    size_t n = lua_rawlen(L, t), total = 0;
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, t, (lua_Integer)i);
        size_t k;
        if (!lua_tolstring(L, -1, &k) || k == 0 || k > 255) luaL_error(L, "bad option 'alpn' (list of protocol names expected)");
        total += k + 1;
        lua_pop(L, 1);
    }
    unsigned char *w = malloc(total ? total : 1);
    if (!w) luaL_error(L, "not enough memory");
    size_t pos = 0;
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, t, (lua_Integer)i);
        size_t k;
        const char *s = lua_tolstring(L, -1, &k);
        w[pos++] = (unsigned char)k;
        memcpy(w + pos, s, k);
        pos += k;
        lua_pop(L, 1);
    }
    *out = w;
    *outlen = (unsigned int)total;
    return 0;
}

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    mw_tlsctx *t = arg;
    (void)ssl;
    if (!t->alpn) return SSL_TLSEXT_ERR_NOACK;
    if (SSL_select_next_proto((unsigned char **)out, outlen, t->alpn, t->alpn_len, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    return SSL_TLSEXT_ERR_OK;
}

static int sni_select(SSL *ssl, int *al, void *arg)
{
    mw_tlsctx *t = arg;
    (void)al;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (!name) return SSL_TLSEXT_ERR_OK;
    for (int i = 0; i < t->nsni; i++) {
        if (strcasecmp(t->sni_name[i], name) == 0) {
            SSL_set_SSL_CTX(ssl, t->sni_ctx[i]);
            return SSL_TLSEXT_ERR_OK;
        }
    }
    return SSL_TLSEXT_ERR_OK;  /* unknown name: the default certificate */
}

/* Loads a certificate chain and key, from files or PEM strings ("-----BEGIN" ...). */
static const char *load_cert(SSL_CTX *ctx, const char *cert, const char *key)
{
    if (strncmp(cert, "-----BEGIN", 10) == 0) {
        BIO *b = BIO_new_mem_buf(cert, -1);
        X509 *x = PEM_read_bio_X509(b, NULL, NULL, NULL);
        if (!x || SSL_CTX_use_certificate(ctx, x) != 1) { X509_free(x); BIO_free(b); return "cannot use the certificate"; }
        X509_free(x);
        X509 *extra;
        while ((extra = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL)
            if (SSL_CTX_add_extra_chain_cert(ctx, extra) != 1) { X509_free(extra); BIO_free(b); return "cannot use the chain"; }
        ERR_clear_error();
        BIO_free(b);
    } else if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        return "cannot load the certificate chain file";
    }
    if (strncmp(key, "-----BEGIN", 10) == 0) {
        BIO *b = BIO_new_mem_buf(key, -1);
        EVP_PKEY *k = PEM_read_bio_PrivateKey(b, NULL, NULL, NULL);
        BIO_free(b);
        if (!k || SSL_CTX_use_PrivateKey(ctx, k) != 1) { EVP_PKEY_free(k); return "cannot use the private key"; }
        EVP_PKEY_free(k);
    } else if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        return "cannot load the private key file";
    }
    if (SSL_CTX_check_private_key(ctx) != 1) return "the private key does not match the certificate";
    return NULL;
}

static int version_of(lua_State *L, const char *v)
{
    if (!v || strcmp(v, "1.2") == 0) return TLS1_2_VERSION;
    if (strcmp(v, "1.3") == 0) return TLS1_3_VERSION;
    return luaL_error(L, "bad option 'min_version' ('1.2' or '1.3' expected, got '%s')", v);
}

static const char *optstr(lua_State *L, int t, const char *k)
{
    const char *v = NULL;
    if (lua_getfield(L, t, k) != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "bad option '%s' (string expected)", k);
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1);  /* still referenced by the options table */
    return v;
}

static int optbool(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

static SSL_CTX *new_ssl_ctx(lua_State *L, int server, int t, char *err, size_t errn)
{
    /* these may raise: read before anything is allocated */
    int minv = version_of(L, optstr(L, t, "min_version"));
    const char *ciphers = optstr(L, t, "ciphers");
    const char *suites = optstr(L, t, "ciphersuites");
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) { tls_reason(NULL, err, errn); return NULL; }
    SSL_CTX_set_min_proto_version(ctx, minv);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    /* one read(2) for a record's header and body (and whatever follows): safe with our
     * edge-triggered waits because we only wait after SSL_read asked for more bytes */
    SSL_CTX_set_read_ahead(ctx, 1);
    /* no SSL_OP_IGNORE_UNEXPECTED_EOF: it would report a peer closing without close_notify
     * as a close_notify (ZERO_RETURN, SSL_RECEIVED_SHUTDOWN set). A bare TCP FIN, which
     * anyone on the path can send, must stay told apart from the peer's own end: ssl_result
     * reads it as the end of the stream and marks it (mw_tls_truncated), and a message that
     * only the close delimits (an HTTP/1 body without a length) fails on it */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (ciphers && SSL_CTX_set_cipher_list(ctx, ciphers) != 1) {
        snprintf(err, errn, "bad cipher list");
        ERR_clear_error();
        SSL_CTX_free(ctx);
        return NULL;
    }
    /* TLS 1.3's suites are a list of their own (the cipher list above is TLS 1.2's) */
    if (suites && (!*suites || SSL_CTX_set_ciphersuites(ctx, suites) != 1)) {
        snprintf(err, errn, "bad ciphersuites list (TLS 1.3 suite names, ':' between them)");
        ERR_clear_error();
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static int ctx_gc(lua_State *L)
{
    mw_tlsctx *t = luaL_checkudata(L, 1, CTX_MT);
    if (t->ctx) SSL_CTX_free(t->ctx);
    t->ctx = NULL;
    for (int i = 0; i < t->nsni; i++) {
        SSL_CTX_free(t->sni_ctx[i]);
        free(t->sni_name[i]);
        free(t->sni_files[2 * i]);
        free(t->sni_files[2 * i + 1]);
    }
    free(t->sni_ctx);
    free(t->sni_name);
    free(t->sni_files);
    t->sni_ctx = NULL;
    t->sni_name = NULL;
    t->sni_files = NULL;
    t->nsni = 0;
    free(t->alpn);
    t->alpn = NULL;
    for (int i = 0; i < SESS_SLOTS; i++) {
        if (t->sessions[i].sess) SSL_SESSION_free(t->sessions[i].sess);
        free(t->sessions[i].key);
        t->sessions[i].sess = NULL;
        t->sessions[i].key = NULL;
    }
    free(t->cert_file);
    free(t->key_file);
    t->cert_file = t->key_file = NULL;
    return 0;
}

static void configure_verify(lua_State *L, SSL_CTX *ctx, int t, int server, int insecure)
{
    const char *cafile = optstr(L, t, "cafile"), *capath = optstr(L, t, "capath");
    if (cafile || capath) {
        if (SSL_CTX_load_verify_locations(ctx, cafile, capath) != 1)
            luaL_error(L, "cannot load the CA file/path");
    } else if (!server) {
        SSL_CTX_set_default_verify_paths(ctx);
    }
    if (server) {
        lua_getfield(L, t, "verify_client");
        int vc = lua_toboolean(L, -1);
        int optional = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "optional") == 0;
        if (!lua_isnil(L, -1) && !lua_isboolean(L, -1) && !optional)
            luaL_error(L, "bad option 'verify_client' (true or 'optional' expected)");
        lua_pop(L, 1);
        if (vc) SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (optional ? 0 : SSL_VERIFY_FAIL_IF_NO_PEER_CERT), NULL);
    } else {
        SSL_CTX_set_verify(ctx, insecure ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    }
}

/* OpenSSL's new session (after a full handshake; TLS 1.3's tickets come after it, read with
 * the data): kept under the connection's key for the next connection to resume. Returns 1:
 * the reference is ours. */
/* The slot holding key's session, or -1. */
static int sess_slot(const mw_tlsctx *t, const char *key)
{
    for (int i = 0; i < SESS_SLOTS; i++)
        if (t->sessions[i].key && strcmp(t->sessions[i].key, key) == 0) return i;
    return -1;
}

static int new_session(SSL *ssl, SSL_SESSION *sess)
{
    mw_tlsconn *c = SSL_get_app_data(ssl);
    if (!c || !c->t || !c->sess_key || !SSL_SESSION_is_resumable(sess)) return 0;
    mw_tlsctx *t = c->t;
    int slot = sess_slot(t, c->sess_key);
    if (slot < 0) {
        for (int i = 0; i < SESS_SLOTS && slot < 0; i++)
            if (!t->sessions[i].key) slot = i;
        if (slot < 0) {
            slot = t->sess_next;
            t->sess_next = (t->sess_next + 1) % SESS_SLOTS;
        }
        char *key = strdup(c->sess_key);
        if (!key) return 0;
        free(t->sessions[slot].key);
        t->sessions[slot].key = key;
    }
    if (t->sessions[slot].sess) SSL_SESSION_free(t->sessions[slot].sess);
    t->sessions[slot].sess = sess;
    return 1;
}

/* tls_context(opts) -> ctx
 * opts: server (bool), cert, key (files or PEM strings), sni = { [name] = { cert, key } },
 * alpn (list), min_version ("1.2"), ciphers (TLS 1.2), ciphersuites (TLS 1.3), cafile, capath,
 * insecure (client),
 * verify_client (server: true | "optional") */
static int l_tls_context(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    int server = optbool(L, 1, "server");
    int insecure = optbool(L, 1, "insecure");
    lua_getfield(L, 1, "insecure");
    if (!lua_isnil(L, -1) && !lua_isboolean(L, -1)) luaL_error(L, "bad option 'insecure' (boolean expected)");
    lua_pop(L, 1);
    mw_tlsctx *t = lua_newuserdatauv(L, sizeof *t, 1);
    memset(t, 0, sizeof *t);
    luaL_setmetatable(L, CTX_MT);
    int tidx = lua_gettop(L);
    char err[256];
    t->server = server;
    t->insecure = insecure;
    t->ctx = new_ssl_ctx(L, server, 1, err, sizeof err);
    if (!t->ctx) return luaL_error(L, "tls: %s", err);
    configure_verify(L, t->ctx, 1, server, insecure);
    const char *cert = optstr(L, 1, "cert"), *key = optstr(L, 1, "key");
    if (server) {
        if (!cert || !key) return luaL_error(L, "tls: a server context needs 'cert' and 'key'");
        const char *e = load_cert(t->ctx, cert, key);
        if (e) { ERR_clear_error(); return luaL_error(L, "tls: %s", e); }
        if (strncmp(cert, "-----BEGIN", 10) != 0) {
            t->cert_file = strdup(cert);
            t->key_file = strdup(key);
            if (!t->cert_file || !t->key_file) return luaL_error(L, "not enough memory");  /* __gc frees */
        }
        static const unsigned char sid[] = "moonwire";
        SSL_CTX_set_session_id_context(t->ctx, sid, sizeof sid - 1);
        SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_SERVER);
        SSL_CTX_set_alpn_select_cb(t->ctx, alpn_select, t);
        int sni_type = lua_getfield(L, 1, "sni");
        if (sni_type != LUA_TNIL && sni_type != LUA_TTABLE)
            luaL_error(L, "bad option 'sni' (name -> { cert, key } expected)");
        if (sni_type == LUA_TTABLE) {
            int sidx = lua_gettop(L);
            lua_pushnil(L);
            while (lua_next(L, sidx)) {
                if (lua_type(L, -2) != LUA_TSTRING || !lua_istable(L, -1)) luaL_error(L, "bad option 'sni' (name -> { cert, key } expected)");
                int e2 = lua_gettop(L);
                const char *c2 = optstr(L, e2, "cert"), *k2 = optstr(L, e2, "key");
                if (!c2 || !k2) luaL_error(L, "tls: sni entry '%s' needs 'cert' and 'key'", lua_tostring(L, -2));
                SSL_CTX *sc = new_ssl_ctx(L, 1, 1, err, sizeof err);
                if (!sc) luaL_error(L, "tls: %s", err);
                const char *le = load_cert(sc, c2, k2);
                if (le) { SSL_CTX_free(sc); ERR_clear_error(); luaL_error(L, "tls: sni '%s': %s", lua_tostring(L, -2), le); }
                configure_verify(L, sc, 1, 1, 0);
                SSL_CTX_set_session_id_context(sc, sid, sizeof sid - 1);
                SSL_CTX_set_alpn_select_cb(sc, alpn_select, t);
                /* each block is kept as soon as it moved: a failure after one realloc must
                 * not leave the context pointing at the freed old block */
                char *name = strdup(lua_tostring(L, -2));
                int files = strncmp(c2, "-----BEGIN", 10) != 0;
                char *cf = files ? strdup(c2) : NULL, *kf = files ? strdup(k2) : NULL;
                int ok = name && (!files || (cf && kf));
                SSL_CTX **nc = ok ? realloc(t->sni_ctx, (size_t)(t->nsni + 1) * sizeof *nc) : NULL;
                if (nc) t->sni_ctx = nc;
                char **nn = nc ? realloc(t->sni_name, (size_t)(t->nsni + 1) * sizeof *nn) : NULL;
                if (nn) t->sni_name = nn;
                char **nf = nn ? realloc(t->sni_files, (size_t)(t->nsni + 1) * 2 * sizeof *nf) : NULL;
                if (nf) t->sni_files = nf;
                if (!nf) { free(name); free(cf); free(kf); SSL_CTX_free(sc); luaL_error(L, "not enough memory"); }
                t->sni_ctx[t->nsni] = sc;
                t->sni_name[t->nsni] = name;
                t->sni_files[2 * t->nsni] = cf;
                t->sni_files[2 * t->nsni + 1] = kf;
                t->nsni++;
                lua_pop(L, 1);
            }
            SSL_CTX_set_tlsext_servername_callback(t->ctx, sni_select);
            SSL_CTX_set_tlsext_servername_arg(t->ctx, t);
        }
        lua_pop(L, 1);
    } else {
        if (cert || key) {
            if (!cert || !key) return luaL_error(L, "tls: a client certificate needs both 'cert' and 'key'");
            const char *e = load_cert(t->ctx, cert, key);
            if (e) { ERR_clear_error(); return luaL_error(L, "tls: %s", e); }
        }
        /* sessions resumed by the next connection to the same server (new_session) */
        SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(t->ctx, new_session);
    }
    int alpn_type = lua_getfield(L, 1, "alpn");
    if (alpn_type != LUA_TNIL && alpn_type != LUA_TTABLE)
        luaL_error(L, "bad option 'alpn' (list of protocol names expected)");
    if (alpn_type == LUA_TTABLE) {
        alpn_wire(L, lua_gettop(L), &t->alpn, &t->alpn_len);
        if (!server) SSL_CTX_set_alpn_protos(t->ctx, t->alpn, t->alpn_len);
    } else if (server) {
        static const unsigned char h1[] = "\x08http/1.1";
        t->alpn = malloc(sizeof h1 - 1);
        if (t->alpn) { memcpy(t->alpn, h1, sizeof h1 - 1); t->alpn_len = sizeof h1 - 1; }
    }
    lua_pop(L, 1);
    lua_settop(L, tidx);
    return 1;
}

/* Whether the pair of files would load: tried on a scratch context (NULL: fine). */
static const char *check_pair(const char *cert, const char *key)
{
    SSL_CTX *scratch = SSL_CTX_new(TLS_server_method());
    if (!scratch) return "not enough memory";
    const char *e = load_cert(scratch, cert, key);
    SSL_CTX_free(scratch);
    ERR_clear_error();
    return e;
}

/* A server context's sessions end: its cache is flushed and its ticket keys are new, so no
 * client resumes a session made under the certificate it had (a resumption shows the peer
 * the old session's certificate, never the new one). */
static void forget_sessions(SSL_CTX *ctx)
{
    unsigned char keys[80];    /* OpenSSL 3's ticket key block: name, HMAC and AES keys */
    if (RAND_bytes(keys, sizeof keys) == 1) SSL_CTX_set_tlsext_ticket_keys(ctx, keys, sizeof keys);
    OPENSSL_cleanse(keys, sizeof keys);
    SSL_CTX_flush_sessions(ctx, 0);    /* (a time of 0: every session) */
    ERR_clear_error();
}

/* ctx:reload() -> true | nil, err: re-reads the certificate and key files, the SNI entries'
 * too (new connections use them; open ones keep theirs). Every pair is checked on a scratch
 * context first: one half-replaced (new certificate, old key) leaves them all as they were. */
static int ctx_reload(lua_State *L)
{
    mw_tlsctx *t = luaL_checkudata(L, 1, CTX_MT);
    if (!t->cert_file) return mw_pushfail(L, "the certificate was not given as files", "tls");
    const char *e = check_pair(t->cert_file, t->key_file);
    if (e) return mw_pushfail(L, e, "tls");
    for (int i = 0; i < t->nsni; i++) {
        if (!t->sni_files[2 * i]) continue;
        e = check_pair(t->sni_files[2 * i], t->sni_files[2 * i + 1]);
        if (e) {
            lua_pushnil(L);
            lua_pushfstring(L, "sni '%s': %s", t->sni_name[i], e);
            lua_pushliteral(L, "tls");
            return 3;
        }
    }
    e = load_cert(t->ctx, t->cert_file, t->key_file);
    for (int i = 0; !e && i < t->nsni; i++)
        if (t->sni_files[2 * i]) e = load_cert(t->sni_ctx[i], t->sni_files[2 * i], t->sni_files[2 * i + 1]);
    if (e) {
        ERR_clear_error();
        return mw_pushfail(L, e, "tls");
    }
    forget_sessions(t->ctx);
    for (int i = 0; i < t->nsni; i++) forget_sessions(t->sni_ctx[i]);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- sessions on sockets ------------------------------------------------------------------- */

/* Attaches a TLS session to an open socket (handshake not done yet). */
static const char *attach(mw_sock *s, mw_tlsctx *t, const char *host)
{
    if (s->tls) return "the socket already uses TLS";
    if (!t->server && !t->insecure && !(host && *host)) return "a client needs a host name to verify";
    mw_tlsconn *c = calloc(1, sizeof *c);
    if (!c) return "not enough memory";
    c->pid = getpid();
    c->ssl = SSL_new(t->ctx);
    BIO *b = c->ssl ? sock_bio(s) : NULL;
    if (!b) {
        if (c->ssl) SSL_free(c->ssl);
        free(c);
        return "SSL_new failed";
    }
    SSL_set_bio(c->ssl, b, b);   /* one reference, owned by the session from now on */
    if (t->server) {
        SSL_set_accept_state(c->ssl);
    } else {
        SSL_set_connect_state(c->ssl);
        if (host && *host) {
            unsigned char tmp[16];
            int ip = inet_pton(AF_INET, host, tmp) == 1 || inet_pton(AF_INET6, host, tmp) == 1;
            if (!ip) SSL_set_tlsext_host_name(c->ssl, host);  /* SNI is for names only */
            if (!t->insecure) {
                if (ip) {
                    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host);
                } else {
                    /* a wildcard stands for a whole label only: w*.example.test is no name
                     * for www.example.test (RFC 9525 §6.3, as browsers check) */
                    SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
                    SSL_set1_host(c->ssl, host);
                }
            }
            /* a session of this server (the name verified, the peer's port) is resumed: a
             * resumption is not verified again, so the key holds the name it was verified
             * for, never another's */
            struct sockaddr_storage ss;
            socklen_t sl = sizeof ss;
            unsigned port = 0;
            if (getpeername(s->io.fd, (struct sockaddr *)&ss, &sl) == 0)
                port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                      : ((struct sockaddr_in *)&ss)->sin_port);
            size_t kl = strlen(host) + 8;
            c->sess_key = malloc(kl);
            if (c->sess_key) {
                snprintf(c->sess_key, kl, "%s:%u", host, port);
                c->t = t;
                SSL_set_app_data(c->ssl, c);
                int slot = sess_slot(t, c->sess_key);
                if (slot >= 0) SSL_set_session(c->ssl, t->sessions[slot].sess);
            }
        }
    }
    s->tls = c;
    s->tp = &mw_tls_transport;
    return NULL;
}

/* the accept hook of a TLS listener */
static int attach_accepted(mw_sock *s, void *ctx)
{
    return attach(s, ctx, NULL) ? -1 : 0;
}

/* listener:set_tls(ctx): sockets it accepts are TLS (handshake on their first I/O) */
static int l_set_tls(lua_State *L)
{
    mw_sock *l = mw_sock_check(L, 1, MW_LISTENER_MT);
    mw_tlsctx *t = luaL_checkudata(L, 2, CTX_MT);
    luaL_argcheck(L, t->server, 2, "a server context expected");
    lua_settop(L, 2);
    lua_setiuservalue(L, 1, 1);     /* the listener keeps its context alive */
    l->on_accept = attach_accepted;
    l->accept_arg = t;
    lua_settop(L, 1);
    return 1;
}

static int handshake_k(lua_State *L, int status, lua_KContext ctx);

static int handshake_step(lua_State *L, mw_sock *s, mw_task *t)
{
    mw_tlsconn *c = s->tls;
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->handshake_done = 1;
        lua_pushvalue(L, 1);
        return 1;
    }
    uint32_t want = 0;
    ssize_t x = ssl_result(s, c, r, &want);
    if (x < 0 && errno == EAGAIN)
        return mw_sock_wait(L, s, t, MW_ROLE_READ, want, s->rdeadline, handshake_k, 0);
    if (x == 0) return mw_pushfail(L, "tls: the peer closed the connection during the handshake", "tls");
    if (errno == EPROTO) {
        lua_pushnil(L);
        lua_pushfstring(L, "tls: %s", c->err);
        lua_pushliteral(L, "tls");
        return 3;
    }
    return mw_pusherrno(L, errno);
}

static int handshake_k(lua_State *L, int status, lua_KContext ctx)
{
    mw_sock *s = lua_touserdata(L, 1);
    mw_task *t = s->rt->current;
    int why = mw_sched_reason(t);
    (void)status; (void)ctx;
    if (why == MW_WAKE_TIMEOUT) return mw_pushfail(L, "tls: handshake timeout", "timeout");
    if (why != MW_WAKE_READY && why != MW_WAKE_NONE) return mw_sched_pushwake(L, why);
    if (s->closed) return mw_pushfail(L, "closed", "closed");
    return handshake_step(L, s, t);
}

/* sock:starttls(ctx [, { host = name, timeout = s, defer = bool }]) -> sock | nil, err, code
 * Client contexts verify host (SNI and certificate name). defer: no handshake now (it happens
 * on the first read or write). Called again with the same ctx before the handshake finished
 * (after "timeout"), it resumes the handshake; host is then the first call's. */
static int s_starttls(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    mw_tlsctx *t = luaL_checkudata(L, 2, CTX_MT);
    const char *host = NULL;
    double timeout = 10;
    int defer = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        host = optstr(L, 3, "host");
        lua_getfield(L, 3, "timeout");
        if (!lua_isnil(L, -1)) {
            /* (a numeric string is a timeout too, as everywhere: docs/api.md) */
            if (!lua_isnumber(L, -1)) luaL_error(L, "bad option 'timeout' (number expected)");
            timeout = lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
        defer = optbool(L, 3, "defer");
    }
    if (host && !*host) host = NULL;   /* an empty name is no name: never "verify nothing" */
    if (!t->server && !t->insecure && !host)
        return luaL_error(L, "starttls: a client needs 'host' to verify (or insecure = true)");
    /* bytes read before the upgrade came in plaintext: returned by the first read after the
     * handshake they would pass for TLS data (CVE-2011-0411: a man in the middle appends
     * them to the plaintext "go ahead") */
    if (!s->tls && mw_buf_len(&s->rbuf) > 0)
        return mw_pushfail(L, "tls: bytes received before the upgrade are still buffered", "tls");
    /* the same context again while the handshake is unfinished (it timed out): resume it, as
     * LuaSec's dohandshake is called again after "wantread" */
    int resume = 0;
    if (s->tls && !((mw_tlsconn *)s->tls)->handshake_done) {
        lua_getiuservalue(L, 1, 1);
        resume = lua_rawequal(L, -1, 2);
        lua_pop(L, 1);
    }
    if (resume) {
        lua_settop(L, 1);
    } else {
        const char *e = attach(s, t, host);
        if (e) return mw_pushfail(L, e, "tls");
        lua_settop(L, 2);
        lua_setiuservalue(L, 1, 1);   /* the socket keeps its context alive */
    }
    if (defer) {
        lua_pushvalue(L, 1);
        return 1;
    }
    mw_task *tk = mw_sock_claim(L, s, MW_ROLE_READ);
    s->rdeadline = mw_sched_after(s->rt, timeout);
    return handshake_step(L, s, tk);
}

/* sock:tls_info() -> { version, cipher, alpn, peer_subject, peer_verified, sni } | nil */
static int s_tls_info(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    mw_tlsconn *c = s->tls;
    if (!c) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 6);
    lua_pushstring(L, SSL_get_version(c->ssl));
    lua_setfield(L, -2, "version");
    const char *cipher = SSL_get_cipher_name(c->ssl);
    if (cipher) { lua_pushstring(L, cipher); lua_setfield(L, -2, "cipher"); }
    const unsigned char *alpn;
    unsigned int alen;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alen);
    if (alen) { lua_pushlstring(L, (const char *)alpn, alen); lua_setfield(L, -2, "alpn"); }
    const char *sni = SSL_get_servername(c->ssl, TLSEXT_NAMETYPE_host_name);
    if (sni) { lua_pushstring(L, sni); lua_setfield(L, -2, "sni"); }
    X509 *peer = SSL_get1_peer_certificate(c->ssl);
    if (peer) {
        char buf[512];
        X509_NAME_oneline(X509_get_subject_name(peer), buf, sizeof buf);
        lua_pushstring(L, buf);
        lua_setfield(L, -2, "peer_subject");
        lua_pushboolean(L, SSL_get_verify_result(c->ssl) == X509_V_OK);
        lua_setfield(L, -2, "peer_verified");
        X509_free(peer);
    }
    lua_pushboolean(L, SSL_session_reused(c->ssl));
    lua_setfield(L, -2, "resumed");
    return 1;
}

/* sock:tls_peer_certificate() -> der, signature_name | nil: the peer's leaf certificate (DER)
 * and its signature algorithm's short name ("RSA-SHA256"), for LuaSec-style
 * getpeercertificate() (pgmoon's SCRAM-SHA-256-PLUS channel binding hashes it). The
 * certificate is borrowed (get0) and the bytes go straight into a Lua buffer: nothing to free
 * if a push raises. */
static int s_tls_peer_certificate(lua_State *L)
{
    mw_sock *s = mw_sock_check(L, 1, MW_SOCK_MT);
    mw_tlsconn *c = s->tls;
    X509 *peer = c ? SSL_get0_peer_certificate(c->ssl) : NULL;
    int n = peer ? i2d_X509(peer, NULL) : -1;
    if (n <= 0) {
        lua_pushnil(L);
        return 1;
    }
    luaL_Buffer b;
    unsigned char *p = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)n);
    if (i2d_X509(peer, &p) != n) return luaL_error(L, "i2d_X509 changed its mind");
    luaL_pushresultsize(&b, (size_t)n);
    const char *sig = OBJ_nid2sn(X509_get_signature_nid(peer));
    if (sig) lua_pushstring(L, sig);
    else lua_pushnil(L);
    return 2;
}

/* ctx:is_server() -> whether the context was made with server = true */
static int ctx_is_server(lua_State *L)
{
    mw_tlsctx *t = luaL_checkudata(L, 1, CTX_MT);
    lua_pushboolean(L, t->server);
    return 1;
}

void mw_tls_open(lua_State *L)
{
    static const luaL_Reg cm[] = { { "reload", ctx_reload }, { "is_server", ctx_is_server }, { NULL, NULL } };
    if (luaL_newmetatable(L, CTX_MT)) {
        luaL_newlib(L, cm);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, ctx_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    /* stream methods on sockets */
    luaL_getmetatable(L, MW_SOCK_MT);
    lua_getfield(L, -1, "__index");
    lua_pushcfunction(L, s_starttls);
    lua_setfield(L, -2, "starttls");
    lua_pushcfunction(L, s_tls_info);
    lua_setfield(L, -2, "tls_info");
    lua_pushcfunction(L, s_tls_peer_certificate);
    lua_setfield(L, -2, "tls_peer_certificate");
    lua_pop(L, 2);
    luaL_getmetatable(L, MW_LISTENER_MT);
    lua_getfield(L, -1, "__index");
    lua_pushcfunction(L, l_set_tls);
    lua_setfield(L, -2, "set_tls");
    lua_pop(L, 2);
    lua_pushcfunction(L, l_tls_context);
    lua_setfield(L, -2, "tls_context");
}
