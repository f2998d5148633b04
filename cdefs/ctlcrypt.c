/* ctlcrypt.c: tls-crypt style control-packet wrapping in one native call.
 *
 * Why C: in Python every tls-crypt packet built a cryptography CTR context
 * and ran a one-shot HMAC (~10 us per packet, ~11 packets per handshake on
 * the server and as many again in each load-generator client).  Here a key
 * object keeps a cipher context with the AES key schedule done and an
 * HMAC context with the key pads done, so a packet costs one IV reset, one
 * HMAC re-init (EVP_MAC_init with a NULL key reuses the key) and the two
 * passes over the data.
 *
 * Thread safety: the contexts are per object and each call holds the
 * object's mutex; there is no global mutable state except the EVP_CIPHER /
 * EVP_MAC methods fetched once (pthread_once) and never freed.  No static
 * buffers.  Every OpenSSL return value is checked; on failure the thread's
 * OpenSSL error queue is cleared so no stale error reaches another user of
 * libcrypto in the process (e.g. Python's ssl module).
 *
 * All .c files in cdefs/ form one translation unit: every name here is
 * prefixed bsd_ovpn_cc_ / CC_.
 */
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "ctlcrypt.c needs OpenSSL 3.0 or later (EVP_MAC, EVP_CIPHER_fetch)"
#endif

/* ---- public names (must match cdefs/ctlcrypt.h) ---- */

typedef struct bsd_ovpn_cc_key bsd_ovpn_cc_key;

#define BSD_OVPN_CC_KEY_LEN 32
#define BSD_OVPN_CC_TAG_LEN 32
#define BSD_OVPN_CC_ERR_AUTH -2

/* ---- implementation ---- */

#define CC_IV_LEN 16

struct bsd_ovpn_cc_key {
    pthread_mutex_t lock;
    EVP_CIPHER_CTX *cipher;     /* AES-256-CTR, key set, IV reset per packet */
    EVP_MAC_CTX *mac;           /* HMAC-SHA256, key set, re-initialised per packet */
};

static pthread_once_t cc_once = PTHREAD_ONCE_INIT;
static EVP_CIPHER *cc_aes_ctr;  /* written once under cc_once, then read-only */
static EVP_MAC *cc_hmac;

static void cc_fetch_methods(void)
{
    cc_aes_ctr = EVP_CIPHER_fetch(NULL, "AES-256-CTR", NULL);
    cc_hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (cc_aes_ctr == NULL || cc_hmac == NULL)
        ERR_clear_error();
}

void bsd_ovpn_cc_free(bsd_ovpn_cc_key *k)
{
    if (k == NULL)
        return;
    /* The contexts' own free functions cleanse the key schedule and the
     * HMAC pads/key copy. */
    EVP_CIPHER_CTX_free(k->cipher);
    EVP_MAC_CTX_free(k->mac);
    pthread_mutex_destroy(&k->lock);
    OPENSSL_cleanse(k, sizeof(*k));
    free(k);
}

bsd_ovpn_cc_key *bsd_ovpn_cc_new(const uint8_t *enc_key, const uint8_t *hmac_key)
{
    bsd_ovpn_cc_key *k;
    OSSL_PARAM params[2];

    if (enc_key == NULL || hmac_key == NULL)
        return NULL;
    if (pthread_once(&cc_once, cc_fetch_methods) != 0 || cc_aes_ctr == NULL || cc_hmac == NULL)
        return NULL;
    k = calloc(1, sizeof(*k));
    if (k == NULL)
        return NULL;
    if (pthread_mutex_init(&k->lock, NULL) != 0) {
        free(k);
        return NULL;
    }
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    k->cipher = EVP_CIPHER_CTX_new();
    k->mac = EVP_MAC_CTX_new(cc_hmac);
    if (k->cipher == NULL || k->mac == NULL ||
        EVP_EncryptInit_ex2(k->cipher, cc_aes_ctr, enc_key, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_get_key_length(k->cipher) != BSD_OVPN_CC_KEY_LEN ||
        EVP_CIPHER_CTX_get_iv_length(k->cipher) != CC_IV_LEN ||
        EVP_MAC_init(k->mac, hmac_key, BSD_OVPN_CC_KEY_LEN, params) != 1 ||
        EVP_MAC_CTX_get_mac_size(k->mac) != BSD_OVPN_CC_TAG_LEN) {
        ERR_clear_error();
        bsd_ovpn_cc_free(k);
        return NULL;
    }
    return k;
}

/* HMAC(header || data) into tag (32 bytes).  Caller holds k->lock. */
static int cc_mac(bsd_ovpn_cc_key *k, const uint8_t *header, size_t hlen,
                  const uint8_t *data, size_t dlen, uint8_t *tag)
{
    size_t outl = 0;

    if (EVP_MAC_init(k->mac, NULL, 0, NULL) != 1 ||
        (hlen > 0 && EVP_MAC_update(k->mac, header, hlen) != 1) ||
        (dlen > 0 && EVP_MAC_update(k->mac, data, dlen) != 1) ||
        EVP_MAC_final(k->mac, tag, &outl, BSD_OVPN_CC_TAG_LEN) != 1 ||
        outl != BSD_OVPN_CC_TAG_LEN)
        return -1;
    return 0;
}

/* AES-256-CTR of in (len bytes) from the 16-byte counter block iv into out.
 * Caller holds k->lock. */
static int cc_ctr(bsd_ovpn_cc_key *k, const uint8_t *iv, const uint8_t *in, size_t len,
                  uint8_t *out)
{
    int outl = 0;

    if (EVP_EncryptInit_ex2(k->cipher, NULL, NULL, iv, NULL) != 1)
        return -1;
    if (len == 0)
        return 0;
    if (EVP_EncryptUpdate(k->cipher, out, &outl, in, (int)len) != 1 || outl != (int)len)
        return -1;
    return 0;
}

int bsd_ovpn_cc_seal(bsd_ovpn_cc_key *k, const uint8_t *header, size_t hlen,
                     const uint8_t *plain, size_t plen, uint8_t *out)
{
    int rc;

    if (k == NULL || out == NULL || (hlen > 0 && header == NULL) ||
        (plen > 0 && plain == NULL) || plen > INT_MAX)
        return -1;
    if (pthread_mutex_lock(&k->lock) != 0)
        return -1;
    rc = cc_mac(k, header, hlen, plain, plen, out);
    if (rc == 0)
        rc = cc_ctr(k, out, plain, plen, out + BSD_OVPN_CC_TAG_LEN);
    pthread_mutex_unlock(&k->lock);
    if (rc != 0) {
        ERR_clear_error();
        OPENSSL_cleanse(out, BSD_OVPN_CC_TAG_LEN + plen);
    }
    return rc;
}

int bsd_ovpn_cc_open(bsd_ovpn_cc_key *k, const uint8_t *header, size_t hlen,
                     const uint8_t *tag, const uint8_t *ct, size_t ctlen,
                     uint8_t *out_plain)
{
    uint8_t check[BSD_OVPN_CC_TAG_LEN];
    int rc;

    if (k == NULL || tag == NULL || (hlen > 0 && header == NULL) ||
        (ctlen > 0 && (ct == NULL || out_plain == NULL)) || ctlen > INT_MAX)
        return -1;
    if (pthread_mutex_lock(&k->lock) != 0)
        return -1;
    rc = cc_ctr(k, tag, ct, ctlen, out_plain);
    if (rc == 0)
        rc = cc_mac(k, header, hlen, out_plain, ctlen, check);
    pthread_mutex_unlock(&k->lock);
    if (rc != 0)
        ERR_clear_error();
    else if (CRYPTO_memcmp(check, tag, BSD_OVPN_CC_TAG_LEN) != 0)
        rc = BSD_OVPN_CC_ERR_AUTH;
    if (rc != 0 && ctlen > 0)
        OPENSSL_cleanse(out_plain, ctlen);
    OPENSSL_cleanse(check, sizeof(check));
    return rc;
}
