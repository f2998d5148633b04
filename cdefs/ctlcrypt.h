/* ctlcrypt.h: cffi declarations for control-channel wrapping in one call
 * (cdefs/ctlcrypt.c, wrapped by the ctlcrypt section of bsd_ovpn/binding.py
 * and used by bsd_ovpn/proto/fastcrypto.py).
 *
 * One key object = an AES-256-CTR key and an HMAC-SHA256 key, the pair that
 * tls-crypt (one per direction) and tls-crypt-v2's WKc use, SIV style:
 *   tag = HMAC-SHA256(Ka, header || plain)
 *   ct  = AES-256-CTR(Ke, iv = tag[0..15], plain)
 * Calls on one key object may come from several threads (cffi releases the
 * GIL); each object serialises its own calls.
 */

typedef struct bsd_ovpn_cc_key bsd_ovpn_cc_key;

#define BSD_OVPN_CC_KEY_LEN 32
#define BSD_OVPN_CC_TAG_LEN 32
#define BSD_OVPN_CC_ERR_AUTH -2

/* NULL on out of memory or an OpenSSL failure (both keys are 32 bytes). */
bsd_ovpn_cc_key *bsd_ovpn_cc_new(const uint8_t *enc_key, const uint8_t *hmac_key);
/* Frees the object; its key material is cleansed first.  NULL is a no-op. */
void bsd_ovpn_cc_free(bsd_ovpn_cc_key *k);

/* out (32 + plen bytes) = tag || CTR(iv = tag[:16], plain).  0 or -1. */
int bsd_ovpn_cc_seal(bsd_ovpn_cc_key *k, const uint8_t *header, size_t hlen,
                     const uint8_t *plain, size_t plen, uint8_t *out);
/* out_plain (ctlen bytes) = CTR(iv = tag[:16], ct), then the tag is checked
 * in constant time.  0 ok; BSD_OVPN_CC_ERR_AUTH (out_plain zeroed) if the
 * tag does not match; -1 on an OpenSSL failure. */
int bsd_ovpn_cc_open(bsd_ovpn_cc_key *k, const uint8_t *header, size_t hlen,
                     const uint8_t *tag, const uint8_t *ct, size_t ctlen,
                     uint8_t *out_plain);
