/* idle_hold: opens N keep-alive HTTP/1.1 connections to a server, sends one
 * GET on each and reads the whole response, then holds them all idle until
 * SIGTERM/SIGINT (or -t seconds). bench/http_hello uses it to measure the
 * server's memory per idle connection from a process other than the server.
 *
 *   cc -O2 -o idle_hold idle_hold.c
 *   idle_hold -H 127.0.0.1 -p PORT -n 10000 [-b BATCH] [-s NSRC] [-t SECS]
 *
 * -b: connections opened (connect + request) before their responses are read
 *     (default 200, below the usual listen backlog of 511);
 * -s: spread the connections over source addresses 127.0.0.1 .. 127.0.0.NSRC
 *     (default 1; each source address has ~28,000 ephemeral ports);
 * -t: give up holding after SECS seconds (default 300), a bound in time.
 *
 * Output (stdout, one line each):
 *   holding n=N open_secs=S            once every response has been read
 *   done held=N still_open=K closed_by_server=M
 *                                      on SIGTERM/SIGINT/-t: K connections were
 *                                      still open (not closed by the server)
 * Responses are framed by Content-Length or chunked (nginx + Lua's ngx.print).
 * Exit status 1 (with a message on stderr) if a connection fails or a response
 * is not a complete 200.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, int i) {
    fprintf(stderr, "idle_hold: connection %d: %s%s%s\n", i, what,
            errno ? ": " : "", errno ? strerror(errno) : "");
    exit(1);
}

/* Reads one whole response (head + Content-Length body) from fd. */
static void read_response(int fd, int i) {
    char buf[8192];
    size_t have = 0;
    long need = -1;         /* body bytes (Content-Length); -3: chunked */
    for (;;) {
        ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) die("read", i);
        if (r == 0) { errno = 0; die("closed by the server before the response was complete", i); }
        have += (size_t)r;
        buf[have] = 0;
        char *end = strstr(buf, "\r\n\r\n");
        if (!end) {
            if (have >= sizeof buf - 1) { errno = 0; die("response head too long", i); }
            continue;
        }
        if (need == -1) {
            if (strncmp(buf, "HTTP/1.1 200 ", 13) != 0) { errno = 0; die("status is not HTTP/1.1 200", i); }
            char *p = buf;
            need = -2;
            while ((p = strstr(p, "\r\n")) && p < end) {
                p += 2;
                if (strncasecmp(p, "content-length:", 15) == 0) { need = atol(p + 15); break; }
            }
            if (need == -2) {
                p = buf;
                while ((p = strstr(p, "\r\n")) && p < end) {
                    p += 2;
                    if (strncasecmp(p, "transfer-encoding:", 18) == 0 && strstr(p, "chunked") &&
                        strstr(p, "chunked") < end) { need = -3; break; }
                }
            }
            if (need == -2) { errno = 0; die("neither Content-Length nor chunked in the response", i); }
        }
        size_t head = (size_t)(end + 4 - buf);
        if (need == -3) {   /* one chunked response: done at the last chunk */
            if (have - head >= 5 && memcmp(buf + have - 5, "0\r\n\r\n", 5) == 0 &&
                (have - head == 5 || buf[have - 6] == '\n')) return;
            if (have >= sizeof buf - 1) { errno = 0; die("chunked response too long", i); }
            continue;
        }
        if (have - head >= (size_t)need) {
            if (have - head > (size_t)need) { errno = 0; die("more bytes than the response", i); }
            return;
        }
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, n = 10000, batch = 200, nsrc = 1, hold = 300, opt;
    while ((opt = getopt(argc, argv, "H:p:n:b:s:t:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'n': n = atoi(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 's': nsrc = atoi(optarg); break;
        case 't': hold = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: idle_hold -H HOST -p PORT -n N [-b BATCH] [-s NSRC] [-t SECS]\n");
            return 2;
        }
    }
    if (port <= 0 || n <= 0 || batch <= 0 || nsrc <= 0 || nsrc > 254) {
        fprintf(stderr, "idle_hold: bad arguments\n");
        return 2;
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)n + 16 > rl.rlim_cur) {
        fprintf(stderr, "idle_hold: %d connections need more descriptors than the limit (%llu)\n",
                n, (unsigned long long)rl.rlim_cur);
        return 1;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;      /* no SA_RESTART: pause() returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in dst;
    memset(&dst, 0, sizeof dst);
    dst.sin_family = AF_INET;
    dst.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) {
        fprintf(stderr, "idle_hold: bad IPv4 address %s\n", host);
        return 2;
    }

    char req[256];
    int reqlen = snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: idle_hold\r\n\r\n", host, port);

    int *fds = calloc((size_t)n, sizeof *fds);
    if (!fds) { perror("idle_hold: calloc"); return 1; }
    struct timeval tv = { 10, 0 };   /* no single read or connect waits longer */
    double t0 = now();
    for (int start = 0; start < n && !stop; start += batch) {
        int end = start + batch < n ? start + batch : n;
        for (int i = start; i < end; i++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd < 0) die("socket", i);
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            if (nsrc > 1) {
                struct sockaddr_in src;
                memset(&src, 0, sizeof src);
                src.sin_family = AF_INET;
                src.sin_addr.s_addr = htonl(0x7f000001u + (unsigned)(i % nsrc));
                setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
                if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind", i);
            }
            if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect", i);
            if (write(fd, req, (size_t)reqlen) != reqlen) die("write", i);
            fds[i] = fd;
        }
        for (int i = start; i < end; i++) read_response(fds[i], i);
    }
    if (stop) return 1;
    printf("holding n=%d open_secs=%.2f\n", n, now() - t0);
    fflush(stdout);

    alarm((unsigned)hold);
    while (!stop) pause();

    /* Which connections did the server close meanwhile (EOF or error pending)? */
    int open = 0, closed = 0;
    for (int i = 0; i < n; i++) {
        struct pollfd p = { fds[i], POLLIN | POLLRDHUP, 0 };
        int r = poll(&p, 1, 0);
        if (r == 0) open++;
        else closed++;
    }
    printf("done held=%d still_open=%d closed_by_server=%d\n", n, open, closed);
    fflush(stdout);
    return 0;
}
