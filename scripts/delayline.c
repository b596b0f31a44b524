// delayline: a fixed one-way delay on the packets of an NFQUEUE, for kernels without netem.
//
// This host's kernel has no sch_netem (CONFIG_NET_SCH_NETEM is not set), so the replication
// bench (scripts/bench-replication) puts its round trip on the link this way: an iptables
// rule in a network namespace sends the packets arriving from the peer to queue Q
// (`-j NFQUEUE --queue-num Q`), and this process, run in that namespace, accepts each one
// DELAY microseconds after it was queued, in order. Only the packets' metadata reach
// userspace (NFQNL_COPY_META): their bytes stay in the kernel, and GSO packets stay whole
// (NFQA_CFG_F_GSO), so the cost is one small netlink message per packet and one batch
// verdict per release. Holding packets on the receiving side, after the veth has orphaned
// them, keeps them out of the sender's TCP small-queue budget (which would cap the link at
// tcp_limit_output_bytes per delay). The nfnetlink_queue protocol is spoken directly: no
// library beyond libc.
//
//     cc -O2 -o delayline scripts/delayline.c
//     ip netns exec NS delayline QUEUE DELAY_US
//
// Runs until SIGTERM or SIGINT. A queue that overflows (65536 packets) drops.

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>

#define HELD_MAX (1u << 17) // a power of two above the kernel queue's length

struct held {
    uint64_t release_ns;
    uint32_t id;
};

static struct held held[HELD_MAX];
static uint32_t head, tail; // held[head..tail) in arrival order, indices mod HELD_MAX
static int nl;
static uint32_t seq;
static uint16_t queue;
static volatile sig_atomic_t stop;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

// Appends attribute `type` with `len` bytes of `data` at `buf + *off`, padded to 4 bytes.
static void put_attr(char *buf, size_t *off, uint16_t type, const void *data, uint16_t len) {
    struct nlattr *a = (struct nlattr *)(buf + *off);
    a->nla_len = (uint16_t)(NLA_HDRLEN + len);
    a->nla_type = type;
    memcpy(buf + *off + NLA_HDRLEN, data, len);
    *off += NLA_ALIGN(a->nla_len);
}

// Starts an nfnetlink_queue message of type `type` in `buf`; returns its length so far.
static size_t start_msg(char *buf, uint16_t type, uint16_t flags) {
    struct nlmsghdr *h = (struct nlmsghdr *)buf;
    memset(buf, 0, NLMSG_HDRLEN + sizeof(struct nfgenmsg));
    h->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | type;
    h->nlmsg_flags = NLM_F_REQUEST | flags;
    h->nlmsg_seq = ++seq;
    struct nfgenmsg *g = (struct nfgenmsg *)(buf + NLMSG_HDRLEN);
    g->nfgen_family = AF_UNSPEC;
    g->version = NFNETLINK_V0;
    g->res_id = htons(queue);
    return NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg));
}

static void send_msg(char *buf, size_t len) {
    ((struct nlmsghdr *)buf)->nlmsg_len = (uint32_t)len;
    if (send(nl, buf, len, 0) < 0) {
        perror("delayline: send");
        exit(1);
    }
}

// Sends a config message and waits for its acknowledgement.
static void config(char *buf, size_t len) {
    uint32_t want = ((struct nlmsghdr *)buf)->nlmsg_seq;
    send_msg(buf, len);
    char r[8192];
    for (;;) {
        ssize_t n = recv(nl, r, sizeof r, 0);
        if (n < 0) {
            perror("delayline: recv");
            exit(1);
        }
        struct nlmsghdr *h = (struct nlmsghdr *)r;
        if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_seq == want) {
            int err = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
            if (err) {
                fprintf(stderr, "delayline: queue %u config: %s\n", queue, strerror(-err));
                exit(1);
            }
            return;
        }
    }
}

// Accepts every queued packet up to `id` (the kernel numbers a queue's packets in order).
static void accept_through(uint32_t id) {
    char buf[64];
    size_t off = start_msg(buf, NFQNL_MSG_VERDICT_BATCH, 0);
    struct nfqnl_msg_verdict_hdr v = {.verdict = htonl(NF_ACCEPT), .id = htonl(id)};
    put_attr(buf, &off, NFQA_VERDICT_HDR, &v, sizeof v);
    send_msg(buf, off);
}

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: delayline QUEUE DELAY_US\n");
        return 2;
    }
    queue = (uint16_t)atoi(argv[1]);
    uint64_t delay_ns = (uint64_t)(atof(argv[2]) * 1000.0);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
    if (nl < 0) {
        perror("delayline: netlink socket");
        return 1;
    }
    int rcvbuf = 64 << 20, one = 1;
    if (setsockopt(nl, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        setsockopt(nl, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    setsockopt(nl, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
    struct sockaddr_nl addr = {.nl_family = AF_NETLINK};
    if (bind(nl, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("delayline: bind");
        return 1;
    }
    char buf[256];
    size_t off = start_msg(buf, NFQNL_MSG_CONFIG, NLM_F_ACK);
    struct nfqnl_msg_config_cmd cmd = {.command = NFQNL_CFG_CMD_BIND, .pf = htons(AF_INET)};
    put_attr(buf, &off, NFQA_CFG_CMD, &cmd, sizeof cmd);
    config(buf, off);
    off = start_msg(buf, NFQNL_MSG_CONFIG, NLM_F_ACK);
    struct nfqnl_msg_config_params params = {.copy_range = 0, .copy_mode = NFQNL_COPY_META};
    put_attr(buf, &off, NFQA_CFG_PARAMS, &params, sizeof params);
    uint32_t maxlen = htonl(65536), flags = htonl(NFQA_CFG_F_GSO);
    put_attr(buf, &off, NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof maxlen);
    put_attr(buf, &off, NFQA_CFG_FLAGS, &flags, sizeof flags);
    put_attr(buf, &off, NFQA_CFG_MASK, &flags, sizeof flags);
    config(buf, off);
    fprintf(stderr, "delayline: queue %u, %.0f us\n", queue, delay_ns / 1000.0);

    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (tfd < 0) {
        perror("delayline: timerfd");
        return 1;
    }
    static char rx[1 << 16];
    while (!stop) {
        struct pollfd p[2] = {{.fd = nl, .events = POLLIN}, {.fd = tfd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("delayline: poll");
            return 1;
        }
        if (p[1].revents) {
            uint64_t ticks;
            (void)!read(tfd, &ticks, sizeof ticks);
        }
        if (p[0].revents) {
            uint64_t now = now_ns();
            for (;;) {
                ssize_t n = recv(nl, rx, sizeof rx, MSG_DONTWAIT);
                if (n < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK)
                        break;
                    if (errno == EINTR || errno == ENOBUFS)
                        continue;
                    perror("delayline: recv");
                    return 1;
                }
                int len = (int)n;
                for (struct nlmsghdr *h = (struct nlmsghdr *)rx; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
                    if (h->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET))
                        continue;
                    int alen = (int)h->nlmsg_len - NLMSG_HDRLEN - NLMSG_ALIGN(sizeof(struct nfgenmsg));
                    struct nlattr *a = (struct nlattr *)((char *)NLMSG_DATA(h) + NLMSG_ALIGN(sizeof(struct nfgenmsg)));
                    while (alen >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= alen) {
                        if ((a->nla_type & NLA_TYPE_MASK) == NFQA_PACKET_HDR) {
                            struct nfqnl_msg_packet_hdr *ph = (struct nfqnl_msg_packet_hdr *)((char *)a + NLA_HDRLEN);
                            if (tail - head < HELD_MAX) {
                                held[tail % HELD_MAX] = (struct held){now + delay_ns, ntohl(ph->packet_id)};
                                tail++;
                            }
                            break;
                        }
                        alen -= NLA_ALIGN(a->nla_len);
                        a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len));
                    }
                }
            }
        }
        uint64_t now = now_ns();
        int release = 0;
        uint32_t last = 0;
        while (head != tail && held[head % HELD_MAX].release_ns <= now) {
            last = held[head % HELD_MAX].id;
            head++;
            release = 1;
        }
        if (release)
            accept_through(last);
        if (head != tail) {
            uint64_t at = held[head % HELD_MAX].release_ns;
            struct itimerspec its = {.it_value = {.tv_sec = (time_t)(at / 1000000000u), .tv_nsec = (long)(at % 1000000000u)}};
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }
    }
    return 0;
}
