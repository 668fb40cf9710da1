// flowbridge: per-flow counters and socket attribution, compiled by bcc at load time.
//
// Counting point (see ebpf/README.md): TCX ingress and egress on every interface of every
// network namespace (on `lo` only egress, which stands for both directions), keyed by
// (netns cookie, direction, 5-tuple). Socket-level facts come from cgroup hooks (process
// context: creator, connecter, binder), SOCK_OPS (TCP state callbacks, end of flow) and the
// tcp_destroy_sock tracepoint (sockets that existed before the agent).
//
// Only UAPI types and helpers are used: the headers bcc compiles against may be older than the
// running kernel, so nothing here may depend on the layout of kernel-internal structs.
//
// Compile-time parameters (cflags): MAX_FLOWS, MAX_SOCKS, RINGBUF_PAGES.

#include <uapi/linux/bpf.h>

#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif
#ifndef MAX_SOCKS
#define MAX_SOCKS 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif

#define ETH_HLEN_ 14
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_UDPLITE 136
#define AF_INET_ 2
#define AF_INET6_ 10
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define TCP_STATE_FIN_WAIT1 4
#define TCP_STATE_FIN_WAIT2 5
#define TCP_STATE_CLOSING 11
#define TCP_STATE_CLOSE 7
#define TCP_STATE_LISTEN 10
#define TCX_NEXT_ -1

// Replaced in each TC program's bytecode by the cookie of the namespace it is attached in (see
// ebpf/loader.py): bpf_get_netns_cookie(skb) follows skb->sk, which after a veth crossing is
// the sending socket of the other namespace.
#define NETNS_PLACEHOLDER 0x6662746e73636b69ULL

#define DIR_INGRESS 0
#define DIR_EGRESS 1

// bcc 0.26 declares bpf_get_socket_cookie as returning u32, which truncates the 64-bit cookie.
static __u64 (*fb_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

struct flow_key {
    __u64 netns;       // network namespace cookie
    __u8 saddr[16];    // IPv4 in the first 4 bytes
    __u8 daddr[16];
    __u16 sport;       // host byte order; 0 for ICMP
    __u16 dport;       // ICMP: type << 8 | code
    __u8 proto;
    __u8 ipver;
    __u8 direction;
    __u8 pad;
};

struct flow_val {
    __u64 octets;
    __u64 packets;
    __u64 first_ns;
    __u64 last_ns;
    __u64 tcp_flags;
    __u64 cookie;          // socket that sent it (egress, full sockets only)
    __u64 cgroup_id;       // that socket's cgroup v2 id
    __u64 retrans_packets; // egress TCP segments that resent sequence space already sent
    __u64 retrans_bytes;   // their IP-layer bytes
    __u32 ifindex;
    __u32 seq_end;         // highest sequence number sent + 1 (egress TCP)
    __u32 srtt_us;
    __u32 min_rtt_us;
    __u32 snd_cwnd;
    __u32 state;
    __u32 seq_valid;
    __u32 gen;             // bumped when a new connection reuses the key (see retire)
    __u32 peer_fin_end;    // TCP: sequence number after the other direction's FIN
    __u32 fin_state;       // FIN_* bits below
    // The sending socket's process (TCP, copied from `socks` when the cookie changes), so
    // that a connection the kernel finalises carries it after its socket is gone.
    __u32 tgid;
    __u32 uid;
    __u32 origin;          // sock_info.origin; 0: unknown
    __u32 pad;
    char comm[16];
};

#define FIN_PEER_SENT 1   // the other direction sent a FIN ending at peer_fin_end
#define FIN_PEER_ACKED 2  // this direction acknowledged it

struct sock_info {
    __u64 netns;
    __u64 cgroup_id;
    __u32 tgid;
    __u32 uid;
    __u16 bound_port;
    __u8 protocol;
    __u8 origin;           // 1 socket(), 2 connect(), 3 bind(), 4 inherited from the listener
    __u8 pad[4];
    char comm[16];
};

struct port_key {
    __u64 netns;
    __u16 port;
    __u8 proto;
    __u8 pad[5];
};

struct frag_key {
    __u64 netns;
    __u8 saddr[16];
    __u8 daddr[16];
    __u32 id;
    __u8 proto;
    __u8 ipver;
    __u8 pad[2];
};

struct frag_ports {
    __u16 sport;
    __u16 dport;
};

#define EV_TCP_CLOSE 1
#define EV_TCP_DESTROY 2
#define EV_SOCK_RELEASE 3
#define EV_FLOW_RETIRED 4
#define EV_FLOW_FINAL 5
#define EV_LOOPBACK_FINAL 6

struct event {
    __u32 kind;
    __u32 old_state;
    __u64 cookie;
    __u64 netns;
    __u8 laddr[16];
    __u8 raddr[16];
    __u16 lport;
    __u16 rport;
    __u8 family;
    __u8 proto;
    __u8 pad[2];
    struct sock_info info;
};

// A connection ended and a new one took the same 5-tuple (a client port reused): the old
// flow's final counters, sent before the entry restarts for the new connection.
struct retired {
    __u32 kind;
    __u32 pad;
    struct flow_key key;
    struct flow_val val;
};

// A TCP connection is over (both FINs acknowledged, or a RST): the final counters of the
// direction whose packet ended it and of the other direction, whose entries are deleted.
// EV_LOOPBACK_FINAL (a connection on lo): both are EGRESS entries, each with its sending
// socket's facts, and each stands for the INGRESS flow of the same packets too (see handle).
struct final {
    __u32 kind;
    __u32 has_reverse;
    struct flow_key key;
    struct flow_val val;
    struct flow_val reverse;
};

// Counters visible to the agent; every loss lands here.
#define CTR_FLOW_MAP_FULL 0
#define CTR_SOCK_MAP_FULL 1
#define CTR_EVENTS_LOST 2
#define CTR_FRAG_UNKNOWN 3
#define CTR_TRUNCATED 4
#define CTR_PORT_MAP_FULL 5
#define CTR_EXCLUDED_PACKETS 6
#define N_COUNTERS 8

// The flow map and the socket maps take memory per entry (BPF_F_NO_PREALLOC): preallocated,
// the flow map cost its whole capacity before any flow (64 MB for 250,000 entries), now ~248 B
// a live entry plus a 16 B bucket per entry of capacity. Allocating on insert (bpf_mem_alloc's
// per-CPU caches) costs tc_loopback nothing measurable under connection churn on this kernel
// (bench.kernel_ab, 6 rounds: 442 against 449 ns a run). The socket maps are sized by the
// agent to half the flow capacity (ebpf/collector.py socket_capacity).
BPF_F_TABLE("hash", struct flow_key, struct flow_val, flows, MAX_FLOWS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", __u64, struct sock_info, socks, MAX_SOCKS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct port_key, __u64, ports, MAX_SOCKS, BPF_F_NO_PREALLOC);
BPF_HASH(excluded, struct port_key, __u8, 4096);
BPF_F_TABLE("hash", __u64, __u64, watched, MAX_SOCKS, BPF_F_NO_PREALLOC);
// The highest cookie ever put into `watched` (by the agent, before the cookie itself): every
// TCP socket of the machine runs tcp_destroy_sock, and its `watched` lookup, a miss on a cold
// bucket for nearly all of them, cost ~350 ns per socket; a higher cookie cannot be watched.
BPF_ARRAY(watched_ceiling, __u64, 1);
BPF_TABLE("lru_hash", struct frag_key, struct frag_ports, frags, 4096);
BPF_PERCPU_ARRAY(counters, __u64, N_COUNTERS);
// One bit per port number: set when a socket on that port (in any namespace, of either
// protocol) is excluded. Checking it is an inlined array access, so packets of the countless
// ports nobody excluded skip the `excluded` hash lookups (two per packet on lo).
BPF_ARRAY(excluded_ports, __u64, 1024);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
// Events are submitted with BPF_RB_NO_WAKEUP: the agent drains the ring every poll anyway, and a
// wakeup per event made each poll return at once under connection churn (one full map read
// per event instead of one per poll interval).

static __always_inline void count(__u32 which)
{
    __u64 *c = counters.lookup(&which);
    if (c)
        *c += 1;
}

// ---------------------------------------------------------------------------------------------
// Packet counting (TCX)

struct pkt {
    struct flow_key key;
    __u32 ip_bytes;    // IP-layer bytes of this skb as one packet
    __u32 hdr_len;     // L3 + L4 header bytes, repeated in each GSO segment
    __u32 payload;     // L4 payload bytes (TCP sequence space)
    __u32 seq;
    __u32 ack;
    __u8 tcp_flags;
    __u8 has_l4;
};

// Headers in place when they lie in the skb's linear area (direct packet access: no helper
// call, no copy), else copied to buf by bpf_skb_load_bytes. NULL if the packet is too short.
#define MAX_PEEK_OFFSET 512
static __always_inline const __u8 *peek(struct __sk_buff *skb, __u32 off, __u32 len, __u8 *buf)
{
    const __u8 *data = (const __u8 *)(long)skb->data;
    const __u8 *end = (const __u8 *)(long)skb->data_end;
    if (off <= MAX_PEEK_OFFSET && data + off + len <= end)
        return data + off;
    if (bpf_skb_load_bytes(skb, off, buf, len) < 0)
        return 0;
    return buf;
}

static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, __u8 proto, struct pkt *p)
{
    __u8 buf[20];
    const __u8 *b;
    if (proto == PROTO_TCP) {
        if (!(b = peek(skb, off, 20, buf)))
            return -1;
        p->key.sport = ((__u16)b[0] << 8) | b[1];
        p->key.dport = ((__u16)b[2] << 8) | b[3];
        p->seq = ((__u32)b[4] << 24) | ((__u32)b[5] << 16) | ((__u32)b[6] << 8) | b[7];
        p->ack = ((__u32)b[8] << 24) | ((__u32)b[9] << 16) | ((__u32)b[10] << 8) | b[11];
        p->tcp_flags = b[13];
        p->hdr_len += (b[12] >> 4) * 4;
        p->has_l4 = 1;
    } else if (proto == PROTO_UDP || proto == PROTO_UDPLITE) {
        if (!(b = peek(skb, off, 4, buf)))
            return -1;
        p->key.sport = ((__u16)b[0] << 8) | b[1];
        p->key.dport = ((__u16)b[2] << 8) | b[3];
        p->hdr_len += 8;
        p->has_l4 = 1;
    } else if (proto == PROTO_ICMP || proto == PROTO_ICMPV6) {
        if (!(b = peek(skb, off, 2, buf)))
            return -1;
        p->key.dport = ((__u16)b[0] << 8) | b[1];
        p->hdr_len += 8;
        p->has_l4 = 1;
    }
    return 0;
}

// Ports of non-first fragments come from the first fragment of the same datagram.
static __always_inline void frag_ports(struct pkt *p, __u32 id, int first)
{
    struct frag_key fk = {};
    fk.netns = p->key.netns;
    __builtin_memcpy(fk.saddr, p->key.saddr, 16);
    __builtin_memcpy(fk.daddr, p->key.daddr, 16);
    fk.id = id;
    fk.proto = p->key.proto;
    fk.ipver = p->key.ipver;
    if (first) {
        struct frag_ports fp = {.sport = p->key.sport, .dport = p->key.dport};
        frags.update(&fk, &fp);
        return;
    }
    struct frag_ports *fp = frags.lookup(&fk);
    if (fp) {
        p->key.sport = fp->sport;
        p->key.dport = fp->dport;
    } else {
        count(CTR_FRAG_UNKNOWN);
    }
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 l3, struct pkt *p)
{
    __u8 buf[20];
    const __u8 *h = peek(skb, l3, 20, buf);
    if (!h)
        return -1;
    __u32 ihl = (h[0] & 0x0f) * 4;
    if ((h[0] >> 4) != 4 || ihl < 20)
        return -1;
    p->key.ipver = 4;
    p->key.proto = h[9];
    __builtin_memcpy(p->key.saddr, &h[12], 4);
    __builtin_memcpy(p->key.daddr, &h[16], 4);
    p->ip_bytes = ((__u32)h[2] << 8) | h[3];  // 0 for BIG TCP GSO packets
    p->hdr_len = ihl;
    __u16 frag = ((__u16)h[6] << 8) | h[7];
    __u16 offset = frag & 0x1fff;
    int more = frag & 0x2000;
    if (offset == 0 && parse_l4(skb, l3 + ihl, p->key.proto, p) < 0)
        return -1;
    if (offset || more)
        frag_ports(p, ((__u32)h[4] << 8) | h[5], offset == 0);
    return 0;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 l3, struct pkt *p)
{
    __u8 buf[40];
    const __u8 *h = peek(skb, l3, 40, buf);
    if (!h)
        return -1;
    if ((h[0] >> 4) != 6)
        return -1;
    p->key.ipver = 6;
    __builtin_memcpy(p->key.saddr, &h[8], 16);
    __builtin_memcpy(p->key.daddr, &h[24], 16);
    __u32 payload_len = ((__u32)h[4] << 8) | h[5];
    p->ip_bytes = payload_len ? payload_len + 40 : 0;  // 0: jumbogram or BIG TCP
    __u8 nh = h[6];
    __u32 off = l3 + 40;
    __u32 frag_id = 0;
    int is_frag = 0, first_frag = 1;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __u8 x[8];
        if (nh == 0 || nh == 43 || nh == 60) {
            if (bpf_skb_load_bytes(skb, off, x, 2) < 0)
                return -1;
            nh = x[0];
            off += ((__u32)x[1] + 1) * 8;
        } else if (nh == 44) {
            if (bpf_skb_load_bytes(skb, off, x, 8) < 0)
                return -1;
            nh = x[0];
            is_frag = 1;
            first_frag = ((((__u16)x[2] << 8) | x[3]) & 0xfff8) == 0;
            frag_id = ((__u32)x[4] << 24) | ((__u32)x[5] << 16) | ((__u32)x[6] << 8) | x[7];
            off += 8;
        }
    }
    p->key.proto = nh;
    p->hdr_len = off - l3;
    if (first_frag && parse_l4(skb, off, nh, p) < 0)
        return -1;
    if (is_frag)
        frag_ports(p, frag_id, first_frag);
    return 0;
}

// port: the local socket's port as seen from this packet (source when sent, destination when
// received).
static __always_inline int is_excluded(struct pkt *p, __u16 port)
{
    if (!p->has_l4 || p->key.proto == PROTO_ICMP || p->key.proto == PROTO_ICMPV6)
        return 0;
    __u32 word = port >> 6;
    __u64 *bits = excluded_ports.lookup(&word);
    if (!bits || !(*bits & (1ULL << (port & 63))))
        return 0;
    struct port_key pk = {};
    pk.netns = p->key.netns;
    pk.proto = p->key.proto;
    pk.port = port;
    return excluded.lookup(&pk) != 0;
}

// syn: a TCP SYN, nearly always of a new flow: its insert is tried first (an existing entry,
// as for a retransmitted SYN or a reused 5-tuple, makes it fail with -EEXIST), which saves a
// lookup that would miss.
static __always_inline struct flow_val *flow_entry(struct flow_key *key, __u64 now, int syn)
{
    struct flow_val *v = 0;
    if (!syn && (v = flows.lookup(key)))
        return v;
    struct flow_val init = {};
    init.first_ns = now;
    int err = flows.insert(key, &init);
    if (err && err != -17)  // -EEXIST: another CPU created it first, or a SYN of a known flow
        count(CTR_FLOW_MAP_FULL);
    return flows.lookup(key);
}

static __always_inline void retire(struct flow_key *key, struct flow_val *v, __u64 now)
{
    struct retired *r = events.ringbuf_reserve(sizeof(struct retired));
    if (r) {
        r->kind = EV_FLOW_RETIRED;
        r->pad = 0;
        r->key = *key;
        r->val = *v;
        events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    } else {
        count(CTR_EVENTS_LOST);
    }
    v->octets = 0;
    v->packets = 0;
    v->first_ns = now;
    v->tcp_flags = 0;
    v->cookie = 0;
    v->cgroup_id = 0;
    v->retrans_packets = 0;
    v->retrans_bytes = 0;
    v->seq_valid = 0;
    v->fin_state = 0;
    v->gen += 1;
}

// The sending socket's process into the flow (TCP): the socket's `socks` entry goes when it
// closes, often before the kernel finalises the connection's flows.
static __always_inline void copy_process(struct flow_val *v, __u64 cookie)
{
    struct sock_info *info = socks.lookup(&cookie);
    if (!info)
        return;
    v->tgid = info->tgid;
    v->uid = info->uid;
    v->origin = info->origin;
    __builtin_memcpy(v->comm, info->comm, sizeof(v->comm));
}

// The socket's identity (cookie, cgroup, process), read when the flow's sending socket may have
// changed: always for UDP and the rest (two unconnected sockets can send on one 5-tuple), for TCP
// only on the flow's first packet from a full socket and on a SYN (a connection on a reused
// 5-tuple is a new socket, and a new connection starts with a SYN): a TCP flow has one socket,
// so the cookie helper per packet read the same value again.
static __always_inline void note_socket(struct __sk_buff *skb, struct pkt *p, struct flow_val *v)
{
    __u64 cookie = fb_socket_cookie(skb);
    if (v->cookie == cookie)
        return;
    v->cookie = cookie;
    v->cgroup_id = bpf_skb_cgroup_id(skb);
    if (p->key.proto == PROTO_TCP)
        copy_process(v, cookie);
}

// TCP: bpf_tcp_sock() finds a full TCP socket on its own (NULL for a request or timewait socket,
// whose state and health are not the connection's), so the bpf_sk_fullsock() call is not
// needed; `state` is a sock_common field, readable through the original pointer. Anything else
// (UDP, ICMP, raw sockets, TCP packets sent through a raw socket) takes the full socket's
// cookie and state.
static __always_inline void egress_socket(struct __sk_buff *skb, struct pkt *p,
                                          struct flow_val *v)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return;
    if (p->key.proto == PROTO_TCP) {
        struct bpf_tcp_sock *tp = bpf_tcp_sock(sk);
        if (tp) {
            if (!v->cookie || (p->tcp_flags & TCP_SYN))
                note_socket(skb, p, v);
            v->state = sk->state;
            v->srtt_us = tp->srtt_us >> 3;  // tcp_sock keeps it scaled by 8
            v->min_rtt_us = tp->rtt_min;
            v->snd_cwnd = tp->snd_cwnd;
            return;
        }
    }
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return;
    note_socket(skb, p, v);
    v->state = sk->state;
}

static __always_inline void track_retransmissions(struct pkt *p, struct flow_val *v,
                                                  __u64 packets, __u64 bytes)
{
    __u32 syn = (p->tcp_flags & TCP_SYN) ? 1 : 0;
    __u32 fin = (p->tcp_flags & TCP_FIN) ? 1 : 0;
    __u32 end = p->seq + p->payload + syn + fin;
    if (end == p->seq)
        return;  // pure ACK or RST: no sequence space
    if (v->seq_valid && (__s32)(p->seq - v->seq_end) < 0) {
        // A keep-alive probe resends the last byte on purpose: not a retransmission.
        int keepalive = p->payload <= 1 && !syn && !fin && p->seq == v->seq_end - 1;
        if (!keepalive) {
            __sync_fetch_and_add(&v->retrans_packets, packets);
            __sync_fetch_and_add(&v->retrans_bytes, bytes);
        }
    }
    if (!v->seq_valid || (__s32)(end - v->seq_end) > 0) {
        v->seq_end = end;
        v->seq_valid = 1;
    }
}

// loopback: the other direction of a TCP connection on lo is counted at lo's egress as well
// (the EGRESS entry of the swapped 5-tuple).
static __always_inline void reverse_key(const struct flow_key *k, struct flow_key *r,
                                        int loopback)
{
    r->netns = k->netns;
    __builtin_memcpy(r->saddr, k->daddr, 16);
    __builtin_memcpy(r->daddr, k->saddr, 16);
    r->sport = k->dport;
    r->dport = k->sport;
    r->proto = k->proto;
    r->ipver = k->ipver;
    if (loopback)
        r->direction = k->direction;
    else
        r->direction = k->direction == DIR_EGRESS ? DIR_INGRESS : DIR_EGRESS;
    r->pad = 0;
}

// The connection is over: one record with both directions' final counters, and both entries
// go, so that a late packet (a repeated ACK, a RST answering it) starts a fresh entry.
static __always_inline void finalize(struct flow_key *key, struct flow_val *v,
                                     struct flow_key *rkey, struct flow_val *rv, int loopback)
{
    struct final *f = events.ringbuf_reserve(sizeof(struct final));
    if (!f) {
        // Entries kept: the socket's end event or the agent's idle timeout reports them.
        count(CTR_EVENTS_LOST);
        return;
    }
    f->kind = loopback ? EV_LOOPBACK_FINAL : EV_FLOW_FINAL;
    f->has_reverse = rv != 0;
    f->key = *key;
    __builtin_memcpy(&f->val, v, sizeof(struct flow_val));
    if (rv)
        __builtin_memcpy(&f->reverse, rv, sizeof(struct flow_val));
    else
        __builtin_memset(&f->reverse, 0, sizeof(struct flow_val));
    events.ringbuf_submit(f, BPF_RB_NO_WAKEUP);
    flows.delete(key);
    if (rv)
        flows.delete(rkey);
}

// TCP end of connection from its packets (this direction's entry v, the other's looked up
// only for FIN and RST packets and the ACK of a FIN): a FIN tells the other direction's entry
// where it ends, an ACK covering the other side's FIN marks it acknowledged, and the
// connection is over once both FINs are acknowledged (simultaneous closes included) or at a
// RST.
static __always_inline void track_end(struct pkt *p, struct flow_val *v, int loopback)
{
    __u8 flags = p->tcp_flags;
    int acked_now = 0;
    if ((flags & TCP_ACK) && (v->fin_state & (FIN_PEER_SENT | FIN_PEER_ACKED)) == FIN_PEER_SENT
        && (__s32)(p->ack - v->peer_fin_end) >= 0) {
        v->fin_state |= FIN_PEER_ACKED;
        acked_now = 1;
    }
    if (!(flags & (TCP_FIN | TCP_RST)) && !(acked_now && (v->tcp_flags & TCP_FIN)))
        return;
    struct flow_key rkey;
    reverse_key(&p->key, &rkey, loopback);
    struct flow_val *rv = flows.lookup(&rkey);
    if (flags & TCP_RST) {
        finalize(&p->key, v, &rkey, rv, loopback);
        return;
    }
    if (!rv)
        return;
    if ((flags & TCP_FIN) && !(rv->fin_state & FIN_PEER_SENT)) {
        __u32 syn = (flags & TCP_SYN) ? 1 : 0;
        rv->peer_fin_end = p->seq + p->payload + syn + 1;
        rv->fin_state |= FIN_PEER_SENT;
    }
    if ((v->tcp_flags & TCP_FIN) && (v->fin_state & FIN_PEER_ACKED) &&
        (rv->fin_state & FIN_PEER_ACKED))
        finalize(&p->key, v, &rkey, rv, loopback);
}

static __always_inline void account(struct __sk_buff *skb, struct pkt *p, __u8 direction,
                                    __u64 packets, __u64 bytes, __u64 now, int loopback)
{
    p->key.direction = direction;
    int tcp = p->key.proto == PROTO_TCP && p->has_l4;
    struct flow_val *v = flow_entry(&p->key, now, tcp && (p->tcp_flags & TCP_SYN));
    if (!v)
        return;
    // A SYN on a flow that already saw FIN or RST: a new connection on a reused 5-tuple.
    if ((p->tcp_flags & TCP_SYN) && (v->tcp_flags & (TCP_FIN | TCP_RST)) && tcp)
        retire(&p->key, v, now);
    __sync_fetch_and_add(&v->packets, packets);
    __sync_fetch_and_add(&v->octets, bytes);
    __u64 flags = p->tcp_flags;
    if ((v->tcp_flags & flags) != flags)
        __sync_fetch_and_or(&v->tcp_flags, flags);
    v->last_ns = now;
    v->ifindex = skb->ifindex;
    if (direction == DIR_EGRESS) {
        egress_socket(skb, p, v);
        if (tcp)
            track_retransmissions(p, v, packets, bytes);
    }
    if (tcp)
        track_end(p, v, loopback);
}

// l3: offset of the IP header; loopback: count as sent and received, one packet per skb
// (the lo device carries GSO packets whole, as a capture on lo shows them). A TCP packet on lo
// is counted once, into its EGRESS entry, which userspace reads as the INGRESS flow of the
// same packets too (their counters, flags and times are identical, and an INGRESS entry has no
// socket facts of its own): one entry update instead of two per packet (~25% of a run), and
// one final record per connection carrying both sockets' facts. UDP, ICMP and the rest keep
// an INGRESS entry of their own: the two sockets of a UDP exchange end separately (each at its
// release), which one shared entry could not report.
static __always_inline int handle(struct __sk_buff *skb, __u32 l3, __u8 direction, int loopback)
{
    if (skb->vlan_present)
        return TCX_NEXT_;  // counted on the VLAN device itself
    struct pkt p = {};
    p.key.netns = NETNS_PLACEHOLDER;
    int err;
    if (skb->protocol == bpf_htons(ETH_P_IP_))
        err = parse_ipv4(skb, l3, &p);
    else if (skb->protocol == bpf_htons(ETH_P_IPV6_))
        err = parse_ipv6(skb, l3, &p);
    else
        return TCX_NEXT_;
    if (err < 0) {
        count(CTR_TRUNCATED);
        return TCX_NEXT_;
    }
    __u16 local_port = direction == DIR_EGRESS ? p.key.sport : p.key.dport;
    if (is_excluded(&p, local_port) || (loopback && is_excluded(&p, p.key.dport))) {
        count(CTR_EXCLUDED_PACKETS);
        return TCX_NEXT_;
    }
    __u64 now = bpf_ktime_get_ns();
    __u32 segs = skb->gso_segs;
    __u64 packets = 1;
    __u64 bytes = p.ip_bytes;
    if (segs > 1 || p.ip_bytes == 0) {
        // GSO/GRO packet: its length fields do not hold; use the skb's. (Otherwise the IP
        // length field: the skb may carry link-layer padding.)
        bytes = skb->len - l3;
    }
    if (bytes > p.hdr_len)
        p.payload = bytes - p.hdr_len;
    if (segs > 1 && !loopback) {
        packets = segs;
        bytes += (__u64)(segs - 1) * p.hdr_len;
    }
    account(skb, &p, direction, packets, bytes, now, loopback);
    if (loopback && p.key.proto != PROTO_TCP)
        account(skb, &p, DIR_INGRESS, packets, bytes, now, 0);
    return TCX_NEXT_;
}

int tc_ingress(struct __sk_buff *skb) { return handle(skb, ETH_HLEN_, DIR_INGRESS, 0); }
int tc_egress(struct __sk_buff *skb) { return handle(skb, ETH_HLEN_, DIR_EGRESS, 0); }
int tc_loopback(struct __sk_buff *skb) { return handle(skb, ETH_HLEN_, DIR_EGRESS, 1); }
// Devices without a link-layer header (tun, wireguard, ipip): the skb starts at the IP header.
int tc_ingress_l3(struct __sk_buff *skb) { return handle(skb, 0, DIR_INGRESS, 0); }
int tc_egress_l3(struct __sk_buff *skb) { return handle(skb, 0, DIR_EGRESS, 0); }

// ---------------------------------------------------------------------------------------------
// Socket attribution (cgroup hooks: process context)

static __always_inline void current_process(struct sock_info *info, __u8 origin)
{
    info->tgid = bpf_get_current_pid_tgid() >> 32;
    info->uid = (__u32)bpf_get_current_uid_gid();
    info->cgroup_id = bpf_get_current_cgroup_id();
    info->origin = origin;
    bpf_get_current_comm(info->comm, sizeof(info->comm));
}

static __always_inline void remember_socket(__u64 cookie, struct sock_info *info)
{
    if (socks.update(&cookie, info) < 0)
        count(CTR_SOCK_MAP_FULL);
}

// A new socket's entry, unless it has one: 0 when inserted or counted as a full map, -EEXIST
// when the entry exists. One hash operation where a lookup that misses and an update took two.
static __always_inline int remember_new_socket(__u64 cookie, struct sock_info *info)
{
    int err = socks.insert(&cookie, info);
    if (err == -17)  // -EEXIST
        return err;
    if (err)
        count(CTR_SOCK_MAP_FULL);
    return 0;
}

// TCP sockets are left to connect4/6 and post_bind4/6: a TCP socket sends nothing before one
// of them (or TCP Fast Open's connect, which runs the connect hook too) records the process,
// which is the same one in practice. This hook runs for every socket, so skipping TCP here saves
// a process read and a map insert per connection (~0.7 us under connection churn).
int sock_create(struct bpf_sock *sk)
{
    if (sk->protocol == PROTO_TCP)
        return 1;
    struct sock_info info = {};
    current_process(&info, 1);
    info.netns = bpf_get_netns_cookie(sk);
    info.protocol = sk->protocol;
    remember_socket(fb_socket_cookie(sk), &info);
    return 1;
}

// The socket's port out of `ports` (which finds listeners for their accepted sockets), unless
// another socket bound it since (SO_REUSEPORT).
static __always_inline void forget_port(struct sock_info *info, __u64 cookie)
{
    struct port_key pk = {.netns = info->netns, .port = info->bound_port, .proto = info->protocol};
    __u64 *owner = ports.lookup(&pk);
    if (owner && *owner == cookie)
        ports.delete(&pk);
}

// A connecting socket that has an entry (sock_create's for UDP; bound before connecting for TCP)
// has it changed in place: an update of this map (not preallocated) allocates a new element and
// frees the old one.
static __always_inline void connected_in_place(struct sock_info *old, __u64 cookie)
{
    current_process(old, 2);
    if (old->protocol == PROTO_TCP && old->bound_port)
        forget_port(old, cookie);  // a connecting TCP socket is no listener (see sock_release)
}

// TCP sockets have no entry yet as a rule (sock_create skips them; few bind before connecting):
// the insert is tried first, as in flow_entry. Other sockets have sock_create's entry: looked up.
static __always_inline int on_connect(struct bpf_sock_addr *ctx)
{
    __u64 cookie = fb_socket_cookie(ctx);
    struct sock_info *old;
    if (ctx->protocol != PROTO_TCP && (old = socks.lookup(&cookie))) {
        connected_in_place(old, cookie);
        return 1;
    }
    struct sock_info info = {};
    current_process(&info, 2);
    info.netns = bpf_get_netns_cookie(ctx);
    info.protocol = ctx->protocol;
    if (remember_new_socket(cookie, &info) && (old = socks.lookup(&cookie)))
        connected_in_place(old, cookie);
    return 1;
}

int connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx); }
int connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx); }

static __always_inline int on_bind(struct bpf_sock *sk)
{
    __u64 cookie = fb_socket_cookie(sk);
    __u64 netns = bpf_get_netns_cookie(sk);
    struct sock_info *old = socks.lookup(&cookie);
    if (old) {  // in place, as in on_connect
        current_process(old, 3);
        old->bound_port = sk->src_port;
    } else {
        struct sock_info info = {};
        current_process(&info, 3);
        info.netns = netns;
        info.protocol = sk->protocol;
        info.bound_port = sk->src_port;
        remember_socket(cookie, &info);
    }
    struct port_key pk = {.netns = netns, .port = sk->src_port, .proto = sk->protocol};
    if (ports.update(&pk, &cookie) < 0)
        count(CTR_PORT_MAP_FULL);
    return 1;
}

int post_bind4(struct bpf_sock *sk) { return on_bind(sk); }
int post_bind6(struct bpf_sock *sk) { return on_bind(sk); }

int sock_release(struct bpf_sock *sk)
{
    // A TCP connection outlives its file descriptor (FIN_WAIT, TIME_WAIT): its end comes from
    // the state callback, and its port entry (bind before connect) went at connect. Checked
    // before any map work: this hook runs for both sockets of every connection.
    if (sk->protocol == PROTO_TCP && sk->state != TCP_STATE_CLOSE && sk->state != TCP_STATE_LISTEN)
        return 1;
    __u64 cookie = fb_socket_cookie(sk);
    struct sock_info *info = socks.lookup(&cookie);
    if (!info)
        return 1;
    if (info->bound_port)
        forget_port(info, cookie);
    // Every other socket (UDP, ICMP, raw; TCP never connected, reset or listening) ends here.
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (e) {
        __builtin_memset(e, 0, sizeof(*e));
        e->kind = EV_SOCK_RELEASE;
        e->cookie = cookie;
        e->netns = info->netns;
        e->family = sk->family;
        e->proto = sk->protocol;
        e->info = *info;
        events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    } else {
        count(CTR_EVENTS_LOST);
    }
    socks.delete(&cookie);
    return 1;
}

// ---------------------------------------------------------------------------------------------
// TCP: state callbacks and end of flow (SOCK_OPS)

static __always_inline void inherit_listener(struct bpf_sock_ops *skops, __u64 cookie, __u64 netns)
{
    struct port_key pk = {.netns = netns, .port = skops->local_port, .proto = PROTO_TCP};
    __u64 *listener = ports.lookup(&pk);
    if (!listener)
        return;
    struct sock_info *linfo = socks.lookup(listener);
    if (!linfo)
        return;
    struct sock_info info = *linfo;
    info.origin = 4;
    remember_new_socket(cookie, &info);  // an entry of its own (existing scan) is kept
}

// The connection's egress flow key, as the counting programs build it (an IPv4-mapped IPv6
// socket's packets are IPv4).
static __always_inline void egress_key_of(struct bpf_sock_ops *skops, __u64 netns,
                                          struct flow_key *k)
{
    k->netns = netns;
    k->sport = skops->local_port;
    k->dport = bpf_ntohl(skops->remote_port);
    k->proto = PROTO_TCP;
    k->direction = DIR_EGRESS;
    if (skops->family == AF_INET_) {
        __u32 l = skops->local_ip4, r = skops->remote_ip4;
        __builtin_memcpy(k->saddr, &l, 4);
        __builtin_memcpy(k->daddr, &r, 4);
        k->ipver = 4;
        return;
    }
    // Volatile: clang would merge two of these 4-byte context reads into one 8-byte read, which
    // the verifier rejects.
    __u32 l[4], r[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        l[i] = *(volatile __u32 *)&skops->local_ip6[i];
        r[i] = *(volatile __u32 *)&skops->remote_ip6[i];
    }
    if (l[0] == 0 && l[1] == 0 && l[2] == bpf_htonl(0xffff)) {
        __builtin_memcpy(k->saddr, &l[3], 4);
        __builtin_memcpy(k->daddr, &r[3], 4);
        k->ipver = 4;
        return;
    }
    __builtin_memcpy(k->saddr, l, 16);
    __builtin_memcpy(k->daddr, r, 16);
    k->ipver = 6;
}

// Whether the agent must hear of this close. Not when the counting programs finalised the
// connection already (its entries are gone: the last ACK or the RST passed before the socket
// saw it), nor when the socket handed over to a timewait socket, whose exchange of the last
// FIN and ACK the counting programs see and finalise. Everything else (SYN_SENT timeouts,
// closes before an abortive RST, LAST_ACK timeouts) goes to the agent, which ends the flows
// once they are quiet (ebpf/endings.py).
static __always_inline int close_needs_agent(struct bpf_sock_ops *skops, __u64 *netns)
{
    // The old state first: it settles the timewait handover (the active closer, half of all
    // closes) without the flow map lookup.
    __u32 old = skops->args[0];
    if (old == TCP_STATE_FIN_WAIT1 || old == TCP_STATE_FIN_WAIT2 || old == TCP_STATE_CLOSING)
        return 0;
    *netns = bpf_get_netns_cookie(skops);
    struct flow_key k = {};
    egress_key_of(skops, *netns, &k);
    return flows.lookup(&k) != 0;
}

static __always_inline void tcp_closed(struct bpf_sock_ops *skops, __u64 cookie)
{
    __u64 netns = 0;
    if (!close_needs_agent(skops, &netns)) {
        socks.delete(&cookie);
        return;
    }
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        count(CTR_EVENTS_LOST);
        return;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->kind = EV_TCP_CLOSE;
    e->old_state = skops->args[0];
    e->cookie = cookie;
    e->netns = netns;
    e->family = skops->family;
    e->proto = PROTO_TCP;
    e->lport = skops->local_port;
    e->rport = bpf_ntohl(skops->remote_port);
    if (skops->family == AF_INET_) {
        __u32 l = skops->local_ip4, r = skops->remote_ip4;
        __builtin_memcpy(e->laddr, &l, 4);
        __builtin_memcpy(e->raddr, &r, 4);
    } else {
        __u32 l[4], r[4];
        l[0] = skops->local_ip6[0]; l[1] = skops->local_ip6[1];
        l[2] = skops->local_ip6[2]; l[3] = skops->local_ip6[3];
        r[0] = skops->remote_ip6[0]; r[1] = skops->remote_ip6[1];
        r[2] = skops->remote_ip6[2]; r[3] = skops->remote_ip6[3];
        __builtin_memcpy(e->laddr, l, 16);
        __builtin_memcpy(e->raddr, r, 16);
    }
    struct sock_info *info = socks.lookup(&cookie);
    if (info)
        e->info = *info;
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    socks.delete(&cookie);
}

int sock_ops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB || op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        // Set at TCP_CONNECT already, as a rule: ACTIVE_ESTABLISHED needs no helper call then.
        __u32 flags = skops->bpf_sock_ops_cb_flags;
        if (!(flags & BPF_SOCK_OPS_STATE_CB_FLAG))
            bpf_sock_ops_cb_flags_set(skops, flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    } else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        inherit_listener(skops, fb_socket_cookie(skops), bpf_get_netns_cookie(skops));
    } else if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == TCP_STATE_CLOSE) {
        tcp_closed(skops, fb_socket_cookie(skops));
    }
    return 1;
}

// Sockets that existed before the agent get no SOCK_OPS callbacks; the agent registers their
// cookies (from sock_diag) in `watched` and learns their end here.
TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
    __u64 cookie = args->sock_cookie;
    __u32 zero = 0;
    __u64 *ceiling = watched_ceiling.lookup(&zero);
    if (!ceiling || cookie > *ceiling)
        return 0;
    __u64 *netns = watched.lookup(&cookie);
    if (!netns)
        return 0;
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (e) {
        __builtin_memset(e, 0, sizeof(*e));
        e->kind = EV_TCP_DESTROY;
        e->cookie = cookie;
        e->netns = *netns;
        e->family = args->family;
        e->proto = PROTO_TCP;
        e->lport = args->sport;
        e->rport = args->dport;
        events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    } else {
        count(CTR_EVENTS_LOST);
    }
    watched.delete(&cookie);
    return 0;
}
