/*
 * tls_handshake: closed-loop load of TLS handshakes, one request per connection.
 *
 *   tls_handshake -p PORT [-H 127.0.0.1] [-c CONNS] [-d SECS] [-r] [-v 1.2|1.3]
 *                 [-n SNI] [-t TIMEOUT]
 *
 * Keeps CONNS (default 100) exchanges going for SECS seconds (default 5); each
 * one: TCP connect, TLS handshake, `GET / HTTP/1.1` with `Connection: close`,
 * read the whole response (it must be a 200 with a Content-Length), read until
 * the server closes (its close_notify or EOF), close, start again. One thread,
 * epoll, non-blocking sockets.
 *
 * Every handshake is a full one: a new SSL object each time and no session
 * offered (the client session cache is off). wrk, by contrast, keeps its SSL
 * object across reconnects (SSL_clear), so with `Connection: close` it resumes
 * the previous session on every reconnect after the first. -r does the same
 * on purpose (each connection offers the session, TLS 1.3 ticket included, its
 * previous exchange got), to measure resumed handshakes.
 * -v caps the protocol version (default: 1.3, as negotiated by OpenSSL).
 * The server's certificate is not verified (as wrk); its signature over the
 * handshake (TLS 1.3 CertificateVerify) is checked by OpenSSL all the same.
 *
 * Prints one line of key=value pairs on stdout:
 *   hs=N secs=S hs_per_s=R reused=K p50_us=.. p90_us=.. p99_us=.. max_us=..
 *   errors=E conns=C version=TLSv1.3 cipher=... client_cpu_pct=P client_cpu_s=T
 * (latency: from connect() to the end of the response; exchanges still in
 * flight at the end are not counted). Failed exchanges are counted in errors
 * (the first few are described on stderr) and started again; exit status 1
 * only if none succeeded.
 *
 *   cc -O2 -o tls_handshake tls_handshake.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 1000000 /* 1 µs buckets up to 1 s */
#define RBUF 16384

enum { S_IDLE, S_CONNECTING, S_HANDSHAKE, S_WRITE, S_READ, S_DRAIN };

struct conn {
    int fd, state;
    unsigned events;       /* registered epoll events */
    SSL *ssl;
    SSL_SESSION *sess;     /* -r: the session to offer next time */
    uint64_t t0;
    size_t sent, have;
    long need;             /* body bytes still expected after the head; -1 before the head */
    char buf[RBUF];
};

static SSL_CTX *ctx;
static struct sockaddr_in dst;
static char req[512];
static size_t reqlen;
static const char *sni = "localhost";
static int resume, ep;
static uint32_t *hist;
static uint64_t nhs, nreused, nerrors, lat_max_ns, exch_timeout_ns = 10000000000ull;
static char version[32] = "-", cipher[64] = "-";

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "tls_handshake: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void set_events(struct conn *c, unsigned ev)
{
    if (c->events == ev)
        return;
    struct epoll_event e = { .events = ev, .data.ptr = c };
    if (epoll_ctl(ep, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &e) < 0)
        die("epoll_ctl");
    c->events = ev;
}

static void finish(struct conn *c)
{
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);   /* also removes it from the epoll set */
        c->fd = -1;
    }
    c->events = 0;
    c->state = S_IDLE;
}

static void fail(struct conn *c, const char *why)
{
    if (nerrors < 3) {
        unsigned long e = ERR_peek_last_error();
        char ebuf[256] = "";
        if (e)
            ERR_error_string_n(e, ebuf, sizeof ebuf);
        fprintf(stderr, "tls_handshake: %s%s%s\n", why, e ? ": " : "", ebuf);
    } else if (nerrors == 3) {
        fprintf(stderr, "tls_handshake: (more errors not shown)\n");
    }
    ERR_clear_error();
    nerrors++;
    if (c->sess) {
        SSL_SESSION_free(c->sess);
        c->sess = NULL;
    }
    finish(c);
}

static void start(struct conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->t0 = now_ns();
    c->sent = c->have = 0;
    c->need = -1;
    c->events = 0;
    c->ssl = SSL_new(ctx);
    if (!c->ssl) {
        fprintf(stderr, "tls_handshake: SSL_new failed\n");
        exit(1);
    }
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_tlsext_host_name(c->ssl, sni);
    if (resume && c->sess)
        SSL_set_session(c->ssl, c->sess);
    if (connect(c->fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS) {
        fail(c, strerror(errno));
        return;
    }
    c->state = S_CONNECTING;
    set_events(c, EPOLLOUT);
}

/* Parses the response head in c->buf; returns 1 when done with the head, 0 if
 * more is needed, -1 if it is not a 200 with a Content-Length. */
static int parse_head(struct conn *c)
{
    c->buf[c->have < RBUF ? c->have : RBUF - 1] = 0;
    char *end = strstr(c->buf, "\r\n\r\n");
    if (!end)
        return c->have >= RBUF - 1 ? -1 : 0;
    if (strncmp(c->buf, "HTTP/1.1 200 ", 13) != 0 && strncmp(c->buf, "HTTP/1.0 200 ", 13) != 0)
        return -1;
    long len = -1;
    for (char *p = strstr(c->buf, "\r\n"); p && p < end; p = strstr(p, "\r\n")) {
        p += 2;
        if (strncasecmp(p, "content-length:", 15) == 0) {
            len = atol(p + 15);
            break;
        }
    }
    if (len < 0)
        return -1;
    size_t head = (size_t)(end + 4 - c->buf);
    c->need = len - (long)(c->have - head);
    return c->need < 0 ? -1 : 1;
}

static void done_exchange(struct conn *c)
{
    uint64_t lat = now_ns() - c->t0, us = lat / 1000;
    if (us < HIST_US)
        hist[us]++;
    if (lat > lat_max_ns)
        lat_max_ns = lat;
    nhs++;
    if (SSL_session_reused(c->ssl))
        nreused++;
    if (nhs == 1) {
        snprintf(version, sizeof version, "%s", SSL_get_version(c->ssl));
        snprintf(cipher, sizeof cipher, "%s", SSL_get_cipher_name(c->ssl));
    }
    if (resume) {
        /* The server closed with close_notify: mark ours as sent too (we do
         * not write to a closed socket), else OpenSSL deems the session
         * unclean and never resumes it. */
        SSL_set_shutdown(c->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
        SSL_SESSION *s = SSL_get1_session(c->ssl);
        if (c->sess)
            SSL_SESSION_free(c->sess);
        c->sess = s;
    }
    finish(c);
}

/* Drives the connection as far as it goes. */
static void step(struct conn *c)
{
    for (;;) {
        int r, err;
        switch (c->state) {
        case S_CONNECTING: {
            int soerr = 0;
            socklen_t l = sizeof soerr;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &l);
            if (soerr) {
                errno = soerr;
                fail(c, strerror(soerr));
                return;
            }
            c->state = S_HANDSHAKE;
            break;
        }
        case S_HANDSHAKE:
            r = SSL_connect(c->ssl);
            if (r == 1) {
                c->state = S_WRITE;
                break;
            }
            err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ) { set_events(c, EPOLLIN); return; }
            if (err == SSL_ERROR_WANT_WRITE) { set_events(c, EPOLLOUT); return; }
            fail(c, "handshake failed");
            return;
        case S_WRITE:
            r = SSL_write(c->ssl, req + c->sent, (int)(reqlen - c->sent));
            if (r > 0) {
                c->sent += (size_t)r;
                if (c->sent == reqlen)
                    c->state = S_READ;
                break;
            }
            err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ) { set_events(c, EPOLLIN); return; }
            if (err == SSL_ERROR_WANT_WRITE) { set_events(c, EPOLLOUT); return; }
            fail(c, "write failed");
            return;
        case S_READ:
        case S_DRAIN: {
            char tmp[RBUF];
            char *dst_buf = c->state == S_READ && c->need < 0 ? c->buf + c->have : tmp;
            int room = c->state == S_READ && c->need < 0 ? (int)(RBUF - 1 - c->have) : (int)sizeof tmp;
            r = SSL_read(c->ssl, dst_buf, room);
            if (r > 0) {
                if (c->state == S_DRAIN) {
                    fail(c, "bytes after the response");
                    return;
                }
                if (c->need < 0) {
                    c->have += (size_t)r;
                    int h = parse_head(c);
                    if (h < 0) { fail(c, "not a 200 response with a Content-Length"); return; }
                    if (h == 0) break;
                } else {
                    c->need -= r;
                    if (c->need < 0) { fail(c, "more bytes than the response"); return; }
                }
                if (c->need == 0)
                    c->state = S_DRAIN;   /* now wait for the server to close */
                break;
            }
            err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ) { set_events(c, EPOLLIN); return; }
            if (err == SSL_ERROR_WANT_WRITE) { set_events(c, EPOLLOUT); return; }
            if (c->state == S_DRAIN && (err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL ||
                                        err == SSL_ERROR_SSL)) {
                /* close_notify, or a plain EOF (a server that closes without
                 * one: OpenSSL 3 calls that an "unexpected eof" error) */
                ERR_clear_error();
                done_exchange(c);
                return;
            }
            fail(c, c->need < 0 ? "connection closed before the response" : "response cut short");
            return;
        }
        default:
            return;
        }
    }
}

static double percentile(double p)
{
    uint64_t total = 0, seen = 0;
    for (uint64_t i = 0; i < HIST_US; i++)
        total += hist[i];
    if (total == 0)
        return 0;
    uint64_t rank = (uint64_t)(p * (double)total + 0.999999);
    if (rank < 1)
        rank = 1;
    for (uint64_t i = 0; i < HIST_US; i++) {
        seen += hist[i];
        if (seen >= rank)
            return (double)i + 0.5;
    }
    return (double)lat_max_ns / 1000.0;
}

static void usage(void)
{
    fprintf(stderr, "usage: tls_handshake -p PORT [-H 127.0.0.1] [-c CONNS] [-d SECS] [-r] [-v 1.2|1.3] "
                    "[-n SNI] [-t TIMEOUT]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *ver = NULL;
    int port = 0, opt;
    long nconns = 100;
    double secs = 5, tmo = 10;
    while ((opt = getopt(argc, argv, "H:p:c:d:rv:n:t:h")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': nconns = strtol(optarg, NULL, 10); break;
        case 'd': secs = strtod(optarg, NULL); break;
        case 'r': resume = 1; break;
        case 'v': ver = optarg; break;
        case 'n': sni = optarg; break;
        case 't': tmo = strtod(optarg, NULL); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || nconns < 1 || nconns > 20000 || !(secs > 0 && secs < 3600) || !(tmo > 0))
        usage();
    exch_timeout_ns = (uint64_t)(tmo * 1e9);
    memset(&dst, 0, sizeof dst);
    dst.sin_family = AF_INET;
    dst.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) {
        fprintf(stderr, "tls_handshake: bad IPv4 address %s\n", host);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        fprintf(stderr, "tls_handshake: SSL_CTX_new failed\n");
        return 1;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (ver && strcmp(ver, "1.2") == 0)
        SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
    else if (ver && strcmp(ver, "1.3") != 0)
        usage();
    /* No client-side session cache: sessions are only ever offered with -r,
     * explicitly, from the connection's previous exchange. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    /* A server closing without close_notify is not an error here. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);

    reqlen = (size_t)snprintf(req, sizeof req,
                              "GET / HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: tls_handshake\r\nConnection: close\r\n\r\n",
                              host, port);

    hist = calloc(HIST_US, sizeof *hist);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    if (!hist || !conns)
        die("calloc");
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");

    uint64_t t_start = now_ns(), deadline = t_start + (uint64_t)(secs * 1e9), end;
    for (long i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        start(&conns[i]);
        step(&conns[i]);
    }
    struct epoll_event evs[512];
    uint64_t next_check = t_start + 100000000u;
    for (;;) {
        end = now_ns();
        if (end >= deadline)
            break;
        int ms = (int)((deadline - end) / 1000000u) + 1;
        if (ms > 100)
            ms = 100;
        int n = epoll_wait(ep, evs, 512, ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++)
            step(evs[i].data.ptr);
        /* Restart the finished ones (while there is time); time out stuck ones. */
        uint64_t t = now_ns();
        int check = t >= next_check;
        if (check)
            next_check = t + 100000000u;
        for (long i = 0; i < nconns; i++) {
            struct conn *c = &conns[i];
            if (c->state == S_IDLE) {
                if (t < deadline) {
                    start(c);
                    if (c->state != S_IDLE)
                        step(c);
                }
            } else if (check && t - c->t0 > exch_timeout_ns) {
                fail(c, "exchange timed out");
            }
        }
    }
    /* Exchanges in flight at the deadline are dropped, not counted. */
    double elapsed = (double)(end - t_start) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                 (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    printf("hs=%llu secs=%.3f hs_per_s=%.1f reused=%llu p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f "
           "errors=%llu conns=%ld version=%s cipher=%s client_cpu_pct=%.0f client_cpu_s=%.3f\n",
           (unsigned long long)nhs, elapsed, (double)nhs / elapsed, (unsigned long long)nreused,
           percentile(0.50), percentile(0.90), percentile(0.99), (double)lat_max_ns / 1000.0,
           (unsigned long long)nerrors, nconns, version, cipher, 100.0 * cpu / elapsed, cpu);
    fflush(stdout);
    return nhs == 0 ? 1 : 0;
}
