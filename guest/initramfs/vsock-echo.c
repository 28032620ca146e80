/*
 * vsock-echo: the guest side of nitrile's vsock tests, built as a static
 * binary by scripts/guest-image.sh.
 *
 *   vsock-echo ping PORT     connect to the host (CID 2) on PORT, send
 *                            NITRILE-VSOCK-PING, read the reply; exit 0
 *                            when the reply is exactly that text
 *   vsock-echo listen PORT   listen on PORT, print NITRILE-VSOCK-LISTENING
 *                            on stdout once bound, accept one connection and
 *                            echo what arrives until the peer closes
 *
 * Apart from that readiness line, results are reported through the exit
 * status (and a short reason on stderr); the init script prints markers.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define PING "NITRILE-VSOCK-PING"
#define MAX_TRIES 50

static int parse_port(const char *s, unsigned int *port) {
    char *end;
    unsigned long v;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno != 0 || *s == '\0' || *end != '\0' || v == 0 || v > 0xffffffffUL) {
        return -1;
    }
    *port = (unsigned int)v;
    return 0;
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

static int ping(unsigned int port) {
    struct sockaddr_vm addr;
    char buf[sizeof(PING)];
    size_t got = 0;
    int fd = -1;
    int tries;

    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_HOST;
    addr.svm_port = port;
    /* The transport may still be probing: retry for a few seconds. */
    for (tries = 0; tries < MAX_TRIES; tries++) {
        fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
            break;
        }
        if (fd >= 0) {
            close(fd);
            fd = -1;
        }
        usleep(100000);
    }
    if (fd < 0) {
        perror("vsock-echo: connect");
        return 1;
    }
    if (write_all(fd, PING, strlen(PING)) != 0) {
        perror("vsock-echo: write");
        close(fd);
        return 1;
    }
    while (got < strlen(PING)) {
        ssize_t n = read(fd, buf + got, strlen(PING) - got);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            fprintf(stderr, "vsock-echo: short reply (%zu bytes)\n", got);
            close(fd);
            return 1;
        }
        got += (size_t)n;
    }
    close(fd);
    if (memcmp(buf, PING, strlen(PING)) != 0) {
        fprintf(stderr, "vsock-echo: reply differs\n");
        return 1;
    }
    return 0;
}

static int listen_echo(unsigned int port) {
    struct sockaddr_vm addr;
    char buf[4096];
    int fd, conn;

    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, 1) != 0) {
        perror("vsock-echo: listen");
        return 1;
    }
    printf("NITRILE-VSOCK-LISTENING\n");
    fflush(stdout);
    conn = accept(fd, NULL, NULL);
    if (conn < 0) {
        perror("vsock-echo: accept");
        return 1;
    }
    for (;;) {
        ssize_t n = read(conn, buf, sizeof(buf));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        if (write_all(conn, buf, (size_t)n) != 0) {
            perror("vsock-echo: write");
            return 1;
        }
    }
    close(conn);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    unsigned int port;
    if (argc != 3 || parse_port(argv[2], &port) != 0) {
        fprintf(stderr, "usage: vsock-echo ping|listen PORT\n");
        return 2;
    }
    if (strcmp(argv[1], "ping") == 0) {
        return ping(port);
    }
    if (strcmp(argv[1], "listen") == 0) {
        return listen_echo(port);
    }
    fprintf(stderr, "usage: vsock-echo ping|listen PORT\n");
    return 2;
}
