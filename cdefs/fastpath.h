/* fastpath.h: cffi declarations for the userspace engine's C data plane
 * (cdefs/fastpath.c, wrapped by the fast-path section of bsd_ovpn/binding.py
 * and used by bsd_ovpn/engine/fastpath.py).
 *
 * Functions return 0 (or a count) on success and a negative errno on failure.
 * Addresses are passed as (ipver 4|6, raw address bytes, host-order port,
 * IPv6 scope id) so no sockaddr layout or AF_* value crosses the boundary.
 * Every function is safe to call from any Python thread while the data
 * threads run; cffi releases the GIL around each call.
 */

typedef struct bsd_ovpn_fp_engine bsd_ovpn_fp_engine;

struct bsd_ovpn_fp_peer_counters {
    uint64_t pkt_in;
    uint64_t pkt_out;
    uint64_t bytes_in;
    uint64_t bytes_out;
    double   last_active;      /* CLOCK_MONOTONIC seconds; 0.0 = never */
};

struct bsd_ovpn_fp_iface_counters {
    uint64_t lost_data_in;
    uint64_t lost_data_out;
    uint64_t nomem_data_in;
    uint64_t nomem_data_out;
    uint64_t data_in;
    uint64_t data_out;
    uint64_t tunnel_in;
    uint64_t tunnel_out;
    uint64_t transport_in;
    uint64_t transport_out;
};

#define BSD_OVPN_FP_EV_ROTATE_KEY 1
#define BSD_OVPN_FP_EV_FLOAT 2

struct bsd_ovpn_fp_event {
    int      type;             /* BSD_OVPN_FP_EV_* */
    uint32_t peer_id;
    int      ipver;            /* FLOAT: 4 or 6 */
    uint8_t  addr[16];
    uint16_t port;             /* host order */
    uint32_t scope_id;
};

/* Cipher codes (the kernel's names map onto these in Python). */
#define BSD_OVPN_FP_CIPHER_NONE 0
#define BSD_OVPN_FP_CIPHER_AES_GCM 1
#define BSD_OVPN_FP_CIPHER_CHACHA20_POLY1305 2

bsd_ovpn_fp_engine *bsd_ovpn_fp_new(void);
void bsd_ovpn_fp_free(bsd_ovpn_fp_engine *e);

/* Start the two data threads on udp_fd (a bound UDP socket) and tun_fd
 * (packets, one per read/write).  tun_hdr: bytes of address-family header
 * in front of each tun packet (0 on Linux IFF_NO_PI, 4 on FreeBSD with
 * TUNSIFHEAD).  The tun fd is switched to non-blocking mode. */
int bsd_ovpn_fp_attach(bsd_ovpn_fp_engine *e, int udp_fd, int tun_fd, int tun_hdr);
/* Stop and join the data threads; peers and keys stay. */
int bsd_ovpn_fp_detach(bsd_ovpn_fp_engine *e);
/* Readable whenever events are queued (drained by bsd_ovpn_fp_pop_event). */
int bsd_ovpn_fp_event_fd(bsd_ovpn_fp_engine *e);

int bsd_ovpn_fp_add_peer(bsd_ovpn_fp_engine *e, uint32_t peer_id,
                         int ipver, const uint8_t *addr, uint16_t port, uint32_t scope_id,
                         int local_ipver, const uint8_t *local_addr, uint16_t local_port,
                         const uint8_t *vpn4, const uint8_t *vpn6);
int bsd_ovpn_fp_del_peer(bsd_ovpn_fp_engine *e, uint32_t peer_id,
                         struct bsd_ovpn_fp_peer_counters *out);
int bsd_ovpn_fp_set_remote(bsd_ovpn_fp_engine *e, uint32_t peer_id,
                           int ipver, const uint8_t *addr, uint16_t port, uint32_t scope_id);
int bsd_ovpn_fp_set_key(bsd_ovpn_fp_engine *e, uint32_t peer_id, int slot, int key_id,
                        int cipher,
                        const uint8_t *enc_key, int enc_key_len, const uint8_t *enc_iv,
                        const uint8_t *dec_key, int dec_key_len, const uint8_t *dec_iv);
int bsd_ovpn_fp_swap_keys(bsd_ovpn_fp_engine *e, uint32_t peer_id);
int bsd_ovpn_fp_del_key(bsd_ovpn_fp_engine *e, uint32_t peer_id, int slot);
int bsd_ovpn_fp_send_ping(bsd_ovpn_fp_engine *e, uint32_t peer_id);
int bsd_ovpn_fp_peer_counters(bsd_ovpn_fp_engine *e, uint32_t peer_id,
                              struct bsd_ovpn_fp_peer_counters *out);
void bsd_ovpn_fp_iface_counters(bsd_ovpn_fp_engine *e, struct bsd_ovpn_fp_iface_counters *out);
/* 1 and *out filled when an event was dequeued, 0 when none is queued. */
int bsd_ovpn_fp_pop_event(bsd_ovpn_fp_engine *e, struct bsd_ovpn_fp_event *out);
int bsd_ovpn_fp_peer_count(bsd_ovpn_fp_engine *e);

void bsd_ovpn_fp_set_replay_protection(bsd_ovpn_fp_engine *e, int on);
void bsd_ovpn_fp_set_rotate_threshold(bsd_ovpn_fp_engine *e, uint64_t threshold);
/* UDP segmentation offload (Linux UDP_SEGMENT / UDP_GRO), used when the
 * kernel has it; set_offload(0) before attach keeps one datagram per send
 * and receive.  offload_state: bit 0 = GSO in use, bit 1 = GRO in use. */
void bsd_ovpn_fp_set_offload(bsd_ovpn_fp_engine *e, int on);
int bsd_ovpn_fp_offload_state(bsd_ovpn_fp_engine *e);
/* Link state (START_VPN): while down, tun packets are counted lost_data out. */
void bsd_ovpn_fp_set_running(bsd_ovpn_fp_engine *e, int up);

/* The route-gateway step of TX peer selection: a small longest-prefix table
 * (Python mirrors the routes it installs through the tunnel) mapping a
 * prefix to a gateway address, which is then matched against the peers'
 * VPN addresses.  del_route with plen -1 clears the table. */
int bsd_ovpn_fp_add_route(bsd_ovpn_fp_engine *e, int ipver, const uint8_t *prefix, int plen,
                          const uint8_t *gateway);
int bsd_ovpn_fp_del_route(bsd_ovpn_fp_engine *e, int ipver, const uint8_t *prefix, int plen);

/* Test hook: the TX sequence counter of the key in `slot` (the next packet
 * uses this value); set_tx_seq lets tests reach the rotate/wrap limits. */
int bsd_ovpn_fp_set_tx_seq(bsd_ovpn_fp_engine *e, uint32_t peer_id, int slot, uint64_t next_seq);
