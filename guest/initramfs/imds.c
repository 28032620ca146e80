/*
 * imds: the guest's client of the instance metadata service, built as a
 * static binary by scripts/guest-image.sh.
 *
 *   imds get PATH   PUT /latest/api/token (header
 *                   X-aws-ec2-metadata-token-ttl-seconds) for a session
 *                   token, then GET PATH with the token in
 *                   X-aws-ec2-metadata-token; the body goes to stdout
 *
 * Exit status 0 when both answers are 200 OK (the body then is written
 * whole, never in part), 1 on anything else with one line on stderr saying
 * what (the HTTP status, a timeout, an oversized answer), 2 on bad usage.
 *
 * The service is 169.254.169.254:80; the environment variable IMDS_ADDR
 * (an IPv4 address and port, "a.b.c.d:port") names another, for testing
 * this program on a host.
 *
 * Plain sockets and HTTP/1.1 with "Connection: close"; a body is delimited
 * by Content-Length, chunked transfer coding or the end of the connection.
 * Every read is bounded: a response header of at most MAX_HEADER_BYTES, a
 * body of at most MAX_BODY_BYTES, a token of at most MAX_TOKEN_BYTES; each
 * request has CONNECT_TIMEOUT_MS to connect and REQUEST_TIMEOUT_MS in all.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_ADDR "169.254.169.254"
#define DEFAULT_PORT 80
#define TOKEN_PATH "/latest/api/token"
#define TOKEN_TTL_SECONDS 300

/* Bounds on what the service may send and on what the caller may ask. */
#define MAX_HEADER_BYTES 8192
#define MAX_BODY_BYTES (1024 * 1024)
#define MAX_TOKEN_BYTES 1024
#define MAX_PATH_BYTES 1024
#define MAX_CHUNK_LINE_BYTES 256
#define CONNECT_TIMEOUT_MS 3000
#define REQUEST_TIMEOUT_MS 10000

struct endpoint {
    struct sockaddr_in addr;
    char text[32];
};

/* A response being read: the connection, a buffer, the deadline. */
struct reader {
    int fd;
    char buf[MAX_HEADER_BYTES];
    size_t len;
    size_t pos;
    long long deadline_ms;
};

struct response {
    int status;
    char reason[64];
    size_t body_len;
};

static char body[MAX_BODY_BYTES];

static const char *method_name;
static const char *request_path;

static void fail(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "imds: %s %s: ", method_name, request_path);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits until fd is ready for events or the deadline passes: 0, or -1 on
 * timeout (errno ETIMEDOUT) or error. */
static int wait_fd(int fd, short events, long long deadline_ms) {
    for (;;) {
        long long left = deadline_ms - now_ms();
        struct pollfd p = {.fd = fd, .events = events};
        int n;
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        n = poll(&p, 1, (int)left);
        if (n > 0) {
            return 0;
        }
        if (n == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (errno != EINTR) {
            return -1;
        }
    }
}

static int parse_endpoint(const char *s, struct endpoint *ep) {
    char host[INET_ADDRSTRLEN];
    const char *colon;
    char *end;
    unsigned long port = DEFAULT_PORT;
    size_t hlen;

    memset(ep, 0, sizeof(*ep));
    ep->addr.sin_family = AF_INET;
    if (s == NULL || *s == '\0') {
        s = DEFAULT_ADDR;
    }
    colon = strchr(s, ':');
    hlen = colon ? (size_t)(colon - s) : strlen(s);
    if (hlen == 0 || hlen >= sizeof(host)) {
        return -1;
    }
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    if (colon) {
        errno = 0;
        port = strtoul(colon + 1, &end, 10);
        if (errno != 0 || colon[1] == '\0' || *end != '\0' || port == 0 || port > 65535) {
            return -1;
        }
    }
    if (inet_pton(AF_INET, host, &ep->addr.sin_addr) != 1) {
        return -1;
    }
    ep->addr.sin_port = htons((unsigned short)port);
    snprintf(ep->text, sizeof(ep->text), "%s:%lu", host, port);
    return 0;
}

/* A request target or header value: printable ASCII, no space, no CR/LF. */
static int is_token_text(const char *s, size_t len) {
    size_t i;
    if (len == 0) {
        return 0;
    }
    for (i = 0; i < len; i++) {
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) {
            return 0;
        }
    }
    return 1;
}

static int connect_to(const struct endpoint *ep, long long deadline_ms) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int err = 0;
    socklen_t errlen = sizeof(err);
    long long connect_deadline = now_ms() + CONNECT_TIMEOUT_MS;

    if (connect_deadline > deadline_ms) {
        connect_deadline = deadline_ms;
    }
    if (fd < 0) {
        fail("socket: %s", strerror(errno));
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)&ep->addr, sizeof(ep->addr)) != 0) {
        if (errno != EINPROGRESS) {
            fail("connect %s: %s", ep->text, strerror(errno));
            close(fd);
            return -1;
        }
        if (wait_fd(fd, POLLOUT, connect_deadline) != 0) {
            fail("connect %s: %s", ep->text, strerror(errno));
            close(fd);
            return -1;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &errlen) != 0 || err != 0) {
            fail("connect %s: %s", ep->text, strerror(err ? err : errno));
            close(fd);
            return -1;
        }
    }
    return fd;
}

static int send_all(int fd, const char *buf, size_t len, long long deadline_ms) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (wait_fd(fd, POLLOUT, deadline_ms) != 0) {
                    return -1;
                }
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads more into r->buf after the unread bytes: >0 bytes, 0 at the end of
 * the connection, -1 on error or timeout. */
static ssize_t fill(struct reader *r) {
    if (r->pos > 0) {
        memmove(r->buf, r->buf + r->pos, r->len - r->pos);
        r->len -= r->pos;
        r->pos = 0;
    }
    if (r->len == sizeof(r->buf)) {
        errno = ENOBUFS;
        return -1;
    }
    for (;;) {
        ssize_t n = recv(r->fd, r->buf + r->len, sizeof(r->buf) - r->len, 0);
        if (n >= 0) {
            r->len += (size_t)n;
            return n;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            return -1;
        }
        if (wait_fd(r->fd, POLLIN, r->deadline_ms) != 0) {
            return -1;
        }
    }
}

/* The next line (without CRLF or LF), at most max bytes: its length, or -1
 * (a message printed). The line stays valid until the next read. */
static ssize_t read_line(struct reader *r, size_t max, const char **line, const char *what) {
    for (;;) {
        char *nl = memchr(r->buf + r->pos, '\n', r->len - r->pos);
        ssize_t n;
        if (nl != NULL) {
            size_t len = (size_t)(nl - (r->buf + r->pos));
            *line = r->buf + r->pos;
            r->pos += len + 1;
            if (len > 0 && (*line)[len - 1] == '\r') {
                len--;
            }
            if (len > max) {
                fail("%s longer than %zu bytes", what, max);
                return -1;
            }
            return (ssize_t)len;
        }
        if (r->len - r->pos > max + 1) {
            fail("%s longer than %zu bytes", what, max);
            return -1;
        }
        n = fill(r);
        if (n < 0) {
            if (errno == ENOBUFS) {
                fail("%s longer than %zu bytes", what, max);
            } else {
                fail("reading %s: %s", what, strerror(errno));
            }
            return -1;
        }
        if (n == 0) {
            fail("connection closed in the %s", what);
            return -1;
        }
    }
}

/* Appends exactly want body bytes, or up to the end of the connection when
 * want is (size_t)-1. 0, or -1 (a message printed). */
static int read_body(struct reader *r, struct response *resp, size_t want) {
    int to_eof = want == (size_t)-1;
    for (;;) {
        size_t avail = r->len - r->pos;
        size_t take = avail;
        ssize_t n;
        if (!to_eof && take > want) {
            take = want;
        }
        if (take > MAX_BODY_BYTES - resp->body_len) {
            fail("body larger than %d bytes", MAX_BODY_BYTES);
            return -1;
        }
        memcpy(body + resp->body_len, r->buf + r->pos, take);
        resp->body_len += take;
        r->pos += take;
        if (!to_eof) {
            want -= take;
            if (want == 0) {
                return 0;
            }
        }
        n = fill(r);
        if (n < 0) {
            fail("reading the body: %s", strerror(errno));
            return -1;
        }
        if (n == 0) {
            if (to_eof) {
                return 0;
            }
            fail("connection closed %zu bytes before the end of the body", want);
            return -1;
        }
    }
}

static int parse_size(const char *s, size_t len, int base, size_t *out) {
    size_t v = 0;
    size_t i;
    if (len == 0) {
        return -1;
    }
    for (i = 0; i < len; i++) {
        int d;
        char c = s[i];
        if (c >= '0' && c <= '9') {
            d = c - '0';
        } else if (base == 16 && c >= 'a' && c <= 'f') {
            d = c - 'a' + 10;
        } else if (base == 16 && c >= 'A' && c <= 'F') {
            d = c - 'A' + 10;
        } else {
            return -1;
        }
        if (v > (MAX_BODY_BYTES + (size_t)base) / (size_t)base) {
            /* Larger than any body accepted: reported as such. */
            *out = (size_t)MAX_BODY_BYTES + 1;
            return 0;
        }
        v = v * (size_t)base + (size_t)d;
    }
    *out = v;
    return 0;
}

static int header_is(const char *line, size_t len, const char *name, const char **value,
                     size_t *vlen) {
    size_t n = strlen(name);
    if (len <= n || strncasecmp(line, name, n) != 0 || line[n] != ':') {
        return 0;
    }
    line += n + 1;
    len -= n + 1;
    while (len > 0 && (*line == ' ' || *line == '\t')) {
        line++;
        len--;
    }
    while (len > 0 && (line[len - 1] == ' ' || line[len - 1] == '\t')) {
        len--;
    }
    *value = line;
    *vlen = len;
    return 1;
}

static int read_chunked(struct reader *r, struct response *resp) {
    for (;;) {
        const char *line;
        ssize_t len = read_line(r, MAX_CHUNK_LINE_BYTES, &line, "chunk size line");
        size_t size;
        size_t digits = 0;
        if (len < 0) {
            return -1;
        }
        while (digits < (size_t)len && line[digits] != ';' && line[digits] != ' ') {
            digits++;
        }
        if (parse_size(line, digits, 16, &size) != 0) {
            fail("malformed chunk size");
            return -1;
        }
        if (size > MAX_BODY_BYTES - resp->body_len) {
            fail("body larger than %d bytes", MAX_BODY_BYTES);
            return -1;
        }
        if (size == 0) {
            /* Trailer fields up to the empty line. */
            for (;;) {
                len = read_line(r, MAX_HEADER_BYTES, &line, "chunked trailer");
                if (len < 0) {
                    return -1;
                }
                if (len == 0) {
                    return 0;
                }
            }
        }
        if (read_body(r, resp, size) != 0) {
            return -1;
        }
        len = read_line(r, 0, &line, "chunk end");
        if (len != 0) {
            if (len > 0) {
                fail("malformed chunk end");
            }
            return -1;
        }
    }
}

/* Sends one request and reads its response into resp and body: 0, or -1
 * (a message printed). */
static int exchange(const struct endpoint *ep, const char *method, const char *path,
                    const char *header, struct response *resp) {
    static struct reader r;
    char req[MAX_PATH_BYTES + MAX_TOKEN_BYTES + 256];
    const char *line;
    ssize_t len;
    size_t header_bytes = 0;
    size_t content_length = (size_t)-1;
    int chunked = 0;
    int n;

    method_name = method;
    request_path = path;
    memset(resp, 0, sizeof(*resp));
    n = snprintf(req, sizeof(req),
                 "%s %s HTTP/1.1\r\nHost: %s\r\n%s%sContent-Length: 0\r\n"
                 "Connection: close\r\n\r\n",
                 method, path, ep->text, header, header[0] ? "\r\n" : "");
    if (n < 0 || (size_t)n >= sizeof(req)) {
        fail("request too long");
        return -1;
    }
    memset(&r, 0, sizeof(r));
    r.deadline_ms = now_ms() + REQUEST_TIMEOUT_MS;
    r.fd = connect_to(ep, r.deadline_ms);
    if (r.fd < 0) {
        return -1;
    }
    if (send_all(r.fd, req, (size_t)n, r.deadline_ms) != 0) {
        fail("sending the request: %s", strerror(errno));
        close(r.fd);
        return -1;
    }

    /* Status line: HTTP/1.x NNN reason. */
    len = read_line(&r, MAX_HEADER_BYTES, &line, "response header");
    if (len < 0) {
        close(r.fd);
        return -1;
    }
    header_bytes += (size_t)len + 2;
    if (len < 12 || strncmp(line, "HTTP/1.", 7) != 0 || line[8] != ' ' ||
        line[9] < '1' || line[9] > '5' || line[10] < '0' || line[10] > '9' ||
        line[11] < '0' || line[11] > '9' || (len > 12 && line[12] != ' ')) {
        fail("not an HTTP/1.x response");
        close(r.fd);
        return -1;
    }
    resp->status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    if (len > 13) {
        size_t rl = (size_t)len - 13;
        size_t i;
        if (rl >= sizeof(resp->reason)) {
            rl = sizeof(resp->reason) - 1;
        }
        for (i = 0; i < rl; i++) {
            char c = line[13 + i];
            resp->reason[i] = (c >= 0x20 && c <= 0x7e) ? c : '?';
        }
        resp->reason[rl] = '\0';
    }

    /* Header fields, up to the empty line. */
    for (;;) {
        const char *value;
        size_t vlen;
        len = read_line(&r, MAX_HEADER_BYTES, &line, "response header");
        if (len < 0) {
            close(r.fd);
            return -1;
        }
        header_bytes += (size_t)len + 2;
        if (header_bytes > MAX_HEADER_BYTES) {
            fail("response header longer than %d bytes", MAX_HEADER_BYTES);
            close(r.fd);
            return -1;
        }
        if (len == 0) {
            break;
        }
        if (header_is(line, (size_t)len, "Content-Length", &value, &vlen)) {
            size_t v;
            if (parse_size(value, vlen, 10, &v) != 0 ||
                (content_length != (size_t)-1 && content_length != v)) {
                fail("malformed Content-Length");
                close(r.fd);
                return -1;
            }
            if (v > MAX_BODY_BYTES) {
                fail("body larger than %d bytes", MAX_BODY_BYTES);
                close(r.fd);
                return -1;
            }
            content_length = v;
        } else if (header_is(line, (size_t)len, "Transfer-Encoding", &value, &vlen)) {
            if (vlen == 7 && strncasecmp(value, "chunked", 7) == 0) {
                chunked = 1;
            } else {
                fail("unsupported Transfer-Encoding");
                close(r.fd);
                return -1;
            }
        }
    }

    if (chunked) {
        n = read_chunked(&r, resp);
    } else if (content_length != (size_t)-1) {
        n = read_body(&r, resp, content_length);
    } else if (resp->status == 204 || resp->status == 304 || resp->status < 200) {
        n = 0;
    } else {
        n = read_body(&r, resp, (size_t)-1);
    }
    close(r.fd);
    return n;
}

static void fail_status(const struct response *resp) {
    if (resp->reason[0]) {
        fail("HTTP %d %s", resp->status, resp->reason);
    } else {
        fail("HTTP %d", resp->status);
    }
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int get(const char *path) {
    struct endpoint ep;
    struct response resp;
    char header[MAX_TOKEN_BYTES + 64];
    char token[MAX_TOKEN_BYTES + 1];
    size_t tlen;

    method_name = "GET";
    request_path = path;
    if (parse_endpoint(getenv("IMDS_ADDR"), &ep) != 0) {
        fail("IMDS_ADDR is not an IPv4 address and port (a.b.c.d:port)");
        return 2;
    }

    snprintf(header, sizeof(header), "X-aws-ec2-metadata-token-ttl-seconds: %d",
             TOKEN_TTL_SECONDS);
    if (exchange(&ep, "PUT", TOKEN_PATH, header, &resp) != 0) {
        return 1;
    }
    if (resp.status != 200) {
        fail_status(&resp);
        return 1;
    }
    tlen = resp.body_len;
    while (tlen > 0 && (body[tlen - 1] == '\n' || body[tlen - 1] == '\r' ||
                        body[tlen - 1] == ' ' || body[tlen - 1] == '\t')) {
        tlen--;
    }
    if (tlen > MAX_TOKEN_BYTES) {
        fail("token longer than %d bytes", MAX_TOKEN_BYTES);
        return 1;
    }
    if (!is_token_text(body, tlen)) {
        fail("the token is empty or not printable text");
        return 1;
    }
    memcpy(token, body, tlen);
    token[tlen] = '\0';

    snprintf(header, sizeof(header), "X-aws-ec2-metadata-token: %s", token);
    if (exchange(&ep, "GET", path, header, &resp) != 0) {
        return 1;
    }
    if (resp.status != 200) {
        fail_status(&resp);
        return 1;
    }
    if (write_all(STDOUT_FILENO, body, resp.body_len) != 0) {
        fail("writing the body: %s", strerror(errno));
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3 || strcmp(argv[1], "get") != 0) {
        fprintf(stderr, "usage: imds get PATH\n");
        return 2;
    }
    if (argv[2][0] != '/' || strlen(argv[2]) > MAX_PATH_BYTES ||
        !is_token_text(argv[2], strlen(argv[2]))) {
        fprintf(stderr, "imds: the path must start with / and be at most %d printable "
                        "characters without spaces\n", MAX_PATH_BYTES);
        return 2;
    }
    return get(argv[2]);
}
