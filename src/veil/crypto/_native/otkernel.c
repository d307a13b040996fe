/* Native kernel of the IKNP OT extension in veil.crypto.triples_ot.
 *
 * Byte-identical to the numpy reference (_transpose, _tccr, _finish_numpy, _stream); the Python side checks
 * this with a known-answer self-test before it uses the library, and tests/crypto/test_ot_native.py
 * compares both paths on random inputs.
 *
 * - veil_ot_transpose: the 128 x m bit matrix (128 rows of m/8 bytes, little-endian bit order) to
 *   (m, 16) rows: bit r of row byte J of OT 8b + c = bit c of column byte b of row 8J + r.
 *   16 x 16 byte blocks transposed with unpacks, then 8 _mm_movemask_epi8 per 16 rows.
 * - veil_ot_tccr: H(i, x) = pi(pi(x) ^ i) ^ pi(x), pi = AES-128 under a fixed public key (AES-NI),
 *   the tweak start + i XORed into the low 8 bytes (little-endian).
 * - veil_ot_ctr256: the AES-256-CTR column expansion G(k) of every base-OT key, keystream bytes
 *   [offset, offset + n) (counter block 0 first, 128-bit big-endian counter, as OpenSSL's CTR).
 * - veil_ot_finish: the end of one extension call in one pass over 512-OT blocks (cache-resident):
 *   q = G(k^s) ^ (s & u) (column-wise), mc = H(T), m0 = H(Q), m1 = H(Q ^ s).
 *
 * - veil_oh_send / veil_oh_recv: the online step of the dealer-free one-hot product
 *   (veil.crypto.onehot): PRF(leaf, T, k) = pi(leaf ^ (k, T)) ^ leaf ^ (k, T) (MMO, pi = fixed-key
 *   AES-128; lo 8 bytes k, hi 8 bytes T), summed per (feature, leaf) over rows; the receiver's
 *   punctured leaf is masked out and replaced by the peer's correction without a branch.
 *
 * No secret-dependent branches or memory indices: s only selects through an all-ones/zero mask.
 * Only functions marked VEIL_TGT use AES-NI / SSE4.1; the Python loader calls veil_ot_cpu_ok()
 * (cpuid, baseline code) first and never calls them on a CPU without those features.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !(defined(__x86_64__) || defined(__i386__))
#error "otkernel.c needs x86 (AES-NI, SSE4.1); veil falls back to numpy elsewhere"
#endif

#include <cpuid.h>
#include <immintrin.h>

#define VEIL_TGT __attribute__((target("aes,sse4.1")))
#define VEIL_API __attribute__((visibility("default")))

VEIL_API int veil_ot_abi_version(void) { return 3; }

VEIL_API int veil_ot_cpu_ok(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return ((c >> 25) & 1) /* AES */ && ((c >> 19) & 1) /* SSE4.1 */;
}

/* ---------------------------------------------------------------- AES-128 (fixed key) */

#define VEIL_EXPAND(k, rcon) veil_expand_step((k), _mm_aeskeygenassist_si128((k), (rcon)))

VEIL_TGT static inline __m128i veil_expand_step(__m128i key, __m128i gen) {
    gen = _mm_shuffle_epi32(gen, 0xff);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, gen);
}

VEIL_TGT static void veil_aes128_schedule(const uint8_t key[16], __m128i rk[11]) {
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    rk[1] = VEIL_EXPAND(rk[0], 0x01);
    rk[2] = VEIL_EXPAND(rk[1], 0x02);
    rk[3] = VEIL_EXPAND(rk[2], 0x04);
    rk[4] = VEIL_EXPAND(rk[3], 0x08);
    rk[5] = VEIL_EXPAND(rk[4], 0x10);
    rk[6] = VEIL_EXPAND(rk[5], 0x20);
    rk[7] = VEIL_EXPAND(rk[6], 0x40);
    rk[8] = VEIL_EXPAND(rk[7], 0x80);
    rk[9] = VEIL_EXPAND(rk[8], 0x1b);
    rk[10] = VEIL_EXPAND(rk[9], 0x36);
}

/* n <= 8 blocks in place; the loops have constant bounds when n is constant (unrolled, interleaved) */
VEIL_TGT static inline void veil_aes_n(__m128i *b, int n, const __m128i rk[11]) {
    for (int i = 0; i < n; i++) b[i] = _mm_xor_si128(b[i], rk[0]);
    for (int r = 1; r < 10; r++)
        for (int i = 0; i < n; i++) b[i] = _mm_aesenc_si128(b[i], rk[r]);
    for (int i = 0; i < n; i++) b[i] = _mm_aesenclast_si128(b[i], rk[10]);
}

/* TCCR over n <= 8 rows: out[i] = pi(pi(in[i]) ^ (tweak + i)) ^ pi(in[i]); out may alias in */
VEIL_TGT static inline void veil_tccr_n(const uint8_t *in, uint8_t *out, int n, uint64_t tweak,
                                        const __m128i rk[11]) {
    __m128i p[8], x[8];
    for (int i = 0; i < n; i++) p[i] = _mm_loadu_si128((const __m128i *)(in + 16 * i));
    veil_aes_n(p, n, rk);
    for (int i = 0; i < n; i++)
        x[i] = _mm_xor_si128(p[i], _mm_set_epi64x(0, (long long)(tweak + (uint64_t)i)));
    veil_aes_n(x, n, rk);
    for (int i = 0; i < n; i++) _mm_storeu_si128((__m128i *)(out + 16 * i), _mm_xor_si128(x[i], p[i]));
}

VEIL_TGT static void veil_tccr_rows(const uint8_t *in, uint8_t *out, size_t n, uint64_t start,
                                    const __m128i rk[11]) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) veil_tccr_n(in + 16 * i, out + 16 * i, 8, start + i, rk);
    for (; i < n; i++) veil_tccr_n(in + 16 * i, out + 16 * i, 1, start + i, rk);
}

VEIL_API VEIL_TGT void veil_ot_tccr(const uint8_t *in, uint8_t *out, size_t n, uint64_t start,
                                    const uint8_t key[16]) {
    __m128i rk[11];
    veil_aes128_schedule(key, rk);
    veil_tccr_rows(in, out, n, start, rk);
}

/* ---------------------------------------------------------------- AES-256-CTR column expansion */

VEIL_TGT static inline __m128i veil_expand_a(__m128i key, __m128i gen) {
    /* like veil_expand_step, gen already shuffled */
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, gen);
}

#define VEIL_K256(i, rcon)                                                                              \
    do {                                                                                                \
        rk[2 * (i)] = veil_expand_a(rk[2 * (i) - 2],                                                    \
                                    _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[2 * (i) - 1], rcon), 0xff)); \
        if ((i) < 7)                                                                                    \
            rk[2 * (i) + 1] = veil_expand_a(                                                            \
                rk[2 * (i) - 1], _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[2 * (i)], 0x00), 0xaa)); \
    } while (0)

VEIL_TGT static void veil_aes256_schedule(const uint8_t key[32], __m128i rk[15]) {
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
    VEIL_K256(1, 0x01);
    VEIL_K256(2, 0x02);
    VEIL_K256(3, 0x04);
    VEIL_K256(4, 0x08);
    VEIL_K256(5, 0x10);
    VEIL_K256(6, 0x20);
    VEIL_K256(7, 0x40);
}

VEIL_TGT static inline void veil_aes256_n(__m128i *b, int n, const __m128i rk[15]) {
    for (int i = 0; i < n; i++) b[i] = _mm_xor_si128(b[i], rk[0]);
    for (int r = 1; r < 14; r++)
        for (int i = 0; i < n; i++) b[i] = _mm_aesenc_si128(b[i], rk[r]);
    for (int i = 0; i < n; i++) b[i] = _mm_aesenclast_si128(b[i], rk[14]);
}

/* the 16-byte counter block number (hi, lo) as a 128-bit big-endian integer (CTR as in OpenSSL) */
static inline __m128i veil_ctr_block(uint64_t hi, uint64_t lo) {
    return _mm_set_epi64x((long long)__builtin_bswap64(lo), (long long)__builtin_bswap64(hi));
}

/* For each of nkeys AES-256 keys (32 bytes each): keystream bytes [offset, offset + nbytes) of
 * AES-256-CTR with initial counter block 0 into out + k * nbytes. Equal to reading a
 * cryptography/OpenSSL CTR encryptor (nonce 0^128) sequentially up to offset + nbytes. */
VEIL_API VEIL_TGT void veil_ot_ctr256(const uint8_t *keys, size_t nkeys, uint64_t offset, size_t nbytes,
                                      uint8_t *out) {
    if (nbytes == 0) return;
    uint64_t first = offset >> 4, last = (offset + nbytes - 1) >> 4; /* offsets stay far below 2^64 */
    size_t skip = (size_t)(offset & 15);
    for (size_t k = 0; k < nkeys; k++) {
        __m128i rk[15];
        veil_aes256_schedule(keys + 32 * k, rk);
        uint8_t *dst = out + k * nbytes;
        size_t pos = 0; /* bytes written */
        uint64_t blk = first;
        while (blk <= last) {
            __m128i b[8];
            int n = (last - blk + 1) >= 8 ? 8 : (int)(last - blk + 1);
            for (int i = 0; i < n; i++) b[i] = veil_ctr_block(0, blk + (uint64_t)i);
            if (n == 8)
                veil_aes256_n(b, 8, rk);
            else
                veil_aes256_n(b, n, rk);
            for (int i = 0; i < n; i++) {
                uint8_t tmp[16];
                size_t from = (blk + (uint64_t)i == first) ? skip : 0;
                size_t len = 16 - from;
                if (len > nbytes - pos) len = nbytes - pos;
                if (from == 0 && len == 16) {
                    _mm_storeu_si128((__m128i *)(dst + pos), b[i]);
                } else {
                    _mm_storeu_si128((__m128i *)tmp, b[i]);
                    memcpy(dst + pos, tmp + from, len);
                }
                pos += len;
            }
            blk += (uint64_t)n;
        }
    }
}

/* ---------------------------------------------------------------- bit-matrix transpose */

/* v[k] = bytes b0..b0+15 of row k (16 rows) -> v[c] = byte c of rows 0..15 */
VEIL_TGT static inline void veil_transpose16x16(__m128i v[16]) {
    __m128i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[i] = _mm_unpacklo_epi8(v[2 * i], v[2 * i + 1]);     /* cols 0-7, rows 2i,2i+1 */
        t[i + 8] = _mm_unpackhi_epi8(v[2 * i], v[2 * i + 1]); /* cols 8-15 */
    }
    /* t[h*8 + i]: column half h, row pair i; 16-bit word c = column 8h + c */
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++) {
            u[h * 8 + i] = _mm_unpacklo_epi16(t[h * 8 + 2 * i], t[h * 8 + 2 * i + 1]);     /* cols 8h+0..3 */
            u[h * 8 + 4 + i] = _mm_unpackhi_epi16(t[h * 8 + 2 * i], t[h * 8 + 2 * i + 1]); /* cols 8h+4..7 */
        }
    /* u[g*4 + i]: column quad g (cols 4g..4g+3), row quad i (rows 4i..4i+3); dword c = col 4g + c */
    for (int g = 0; g < 4; g++) {
        __m128i lo0 = _mm_unpacklo_epi32(u[4 * g + 0], u[4 * g + 1]); /* cols 4g, 4g+1; rows 0-7 */
        __m128i hi0 = _mm_unpackhi_epi32(u[4 * g + 0], u[4 * g + 1]); /* cols 4g+2, 4g+3; rows 0-7 */
        __m128i lo1 = _mm_unpacklo_epi32(u[4 * g + 2], u[4 * g + 3]); /* rows 8-15 */
        __m128i hi1 = _mm_unpackhi_epi32(u[4 * g + 2], u[4 * g + 3]);
        v[4 * g + 0] = _mm_unpacklo_epi64(lo0, lo1);
        v[4 * g + 1] = _mm_unpackhi_epi64(lo0, lo1);
        v[4 * g + 2] = _mm_unpacklo_epi64(hi0, hi1);
        v[4 * g + 3] = _mm_unpackhi_epi64(hi0, hi1);
    }
}

static inline __m128i veil_load_part(const uint8_t *p, size_t avail) {
    if (avail >= 16) return _mm_loadu_si128((const __m128i *)p);
    uint8_t tmp[16] = {0};
    memcpy(tmp, p, avail);
    return _mm_loadu_si128((const __m128i *)tmp);
}

/* Transpose column bytes [b0, b0 + nb) (nb <= BLK) of the 128 rows into rows 8*b0 .. 8*(b0+nb) of out.
 * If u != NULL, row j is cols[j] ^ (u[j] & mask_j) with mask_j all-ones iff bit j of s is set.
 * The rows are 'stride' bytes apart (a power of two for 2^k OTs: the same cache set), so each row's
 * BLK = 64 bytes (one cache line when aligned) are consumed at once, not 16 per pass. */
#define VEIL_BLK 64
VEIL_TGT static void veil_transpose_block(const uint8_t *cols, const uint8_t *u, const uint8_t *s,
                                          size_t stride, size_t b0, size_t nb, uint8_t *out) {
    for (int jb = 0; jb < 8; jb++) {
        __m128i v[VEIL_BLK / 16][16];
        for (int k = 0; k < 16; k++) {
            size_t j = (size_t)(16 * jb + k);
            const uint8_t *src = cols + j * stride + b0;
            __m128i m = _mm_setzero_si128();
            if (u) m = _mm_set1_epi8((char)(0 - ((s[j >> 3] >> (j & 7)) & 1)));
            for (size_t g = 0; g * 16 < nb; g++) {
                size_t avail = nb - 16 * g;
                v[g][k] = veil_load_part(src + 16 * g, avail);
                if (u)
                    v[g][k] = _mm_xor_si128(
                        v[g][k], _mm_and_si128(veil_load_part(u + j * stride + b0 + 16 * g, avail), m));
            }
        }
        for (size_t g = 0; g * 16 < nb; g++) {
            size_t ng = nb - 16 * g < 16 ? nb - 16 * g : 16;
            veil_transpose16x16(v[g]);
            for (size_t bb = 0; bb < ng; bb++) {
                __m128i x = v[g][bb];
                uint8_t *row = out + 16 * (8 * (b0 + 16 * g + bb)) + 2 * jb;
                for (int c = 7; c >= 0; c--) {
                    /* bit 7 of byte k = bit c of column byte (row 16 jb + k, b0 + 16 g + bb) */
                    uint16_t w = (uint16_t)_mm_movemask_epi8(_mm_slli_epi64(x, 7 - c));
                    memcpy(row + 16 * c, &w, 2);
                }
            }
        }
    }
}

VEIL_API VEIL_TGT void veil_ot_transpose(const uint8_t *cols, size_t stride, size_t nbytes, uint8_t *out) {
    for (size_t b0 = 0; b0 < nbytes; b0 += VEIL_BLK) {
        size_t nb = nbytes - b0 < VEIL_BLK ? nbytes - b0 : VEIL_BLK;
        veil_transpose_block(cols, NULL, NULL, stride, b0, nb, out);
    }
}

/* ---------------------------------------------------------------- fused end of an extension call */

VEIL_API VEIL_TGT void veil_ot_finish(const uint8_t *t_cols, const uint8_t *q_cols, const uint8_t *peer_u,
                                      const uint8_t s_row[16], size_t nbytes, uint64_t start,
                                      const uint8_t key[16], uint8_t *m0, uint8_t *m1, uint8_t *mc) {
    __m128i rk[11];
    veil_aes128_schedule(key, rk);
    const __m128i s = _mm_loadu_si128((const __m128i *)s_row);
    for (size_t b0 = 0; b0 < nbytes; b0 += VEIL_BLK) {
        size_t nb = nbytes - b0 < VEIL_BLK ? nbytes - b0 : VEIL_BLK;
        size_t r0 = 8 * b0, nr = 8 * nb; /* OT rows of this block (<= 512, 8 KiB per output) */
        veil_transpose_block(t_cols, NULL, NULL, nbytes, b0, nb, mc);
        veil_transpose_block(q_cols, peer_u, s_row, nbytes, b0, nb, m0);
        for (size_t i = 0; i < nr; i++) {
            uint8_t *q = m0 + 16 * (r0 + i);
            _mm_storeu_si128((__m128i *)(m1 + 16 * (r0 + i)),
                             _mm_xor_si128(_mm_loadu_si128((const __m128i *)q), s));
        }
        veil_tccr_rows(mc + 16 * r0, mc + 16 * r0, nr, start + r0, rk);
        veil_tccr_rows(m0 + 16 * r0, m0 + 16 * r0, nr, start + r0, rk);
        veil_tccr_rows(m1 + 16 * r0, m1 + 16 * r0, nr, start + r0, rk);
    }
}

/* ---------------------------------------------------------------- one-hot product (punctured PRF) */

/* buf[2 (l nb + k) + {0,1}] = PRF(leaf l, tweak, block k) for the nl leaves (16 bytes each) of one
 * (row, feature) group, nb blocks per leaf; 8 blocks in flight */
VEIL_TGT static void veil_oh_prf(const uint8_t *leaves, size_t nl, size_t nb, uint64_t tweak,
                                 const __m128i rk[11], uint64_t *buf) {
    __m128i b[8], y[8];
    size_t idx[8];
    int m = 0;
    for (size_t l = 0; l < nl; l++) {
        __m128i leaf = _mm_loadu_si128((const __m128i *)(leaves + 16 * l));
        for (size_t k = 0; k < nb; k++) {
            y[m] = _mm_xor_si128(leaf, _mm_set_epi64x((long long)tweak, (long long)k));
            b[m] = y[m];
            idx[m] = l * nb + k;
            if (++m == 8) {
                veil_aes_n(b, 8, rk);
                for (int q = 0; q < 8; q++) _mm_storeu_si128((__m128i *)(buf + 2 * idx[q]), _mm_xor_si128(b[q], y[q]));
                m = 0;
            }
        }
    }
    if (m) {
        veil_aes_n(b, m, rk);
        for (int q = 0; q < m; q++) _mm_storeu_si128((__m128i *)(buf + 2 * idx[q]), _mm_xor_si128(b[q], y[q]));
    }
}

/* Sender (non-owner): leaves (n, F, nl, 16), x (n, c) its share. d (n, F, c) = x_i + sum_l PRF_ijl;
 * acc (F, nl, c) -= PRF_ijl summed over rows (acc is added to, the caller zeroes it).
 * buf: nl * nb * 2 uint64 scratch, nb = ceil(c / 2). */
VEIL_API VEIL_TGT void veil_oh_send(const uint8_t *leaves, const uint64_t *x, size_t n, size_t F, size_t nl,
                                    size_t c, uint64_t tweak, const uint8_t key[16], uint64_t *d,
                                    uint64_t *acc, uint64_t *buf) {
    __m128i rk[11];
    veil_aes128_schedule(key, rk);
    size_t nb = (c + 1) / 2;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < F; j++) {
            veil_oh_prf(leaves + 16 * nl * (i * F + j), nl, nb, tweak, rk, buf);
            uint64_t *dd = d + c * (i * F + j);
            for (size_t q = 0; q < c; q++) dd[q] = x[i * c + q];
            for (size_t l = 0; l < nl; l++) {
                const uint64_t *v = buf + 2 * nb * l;
                uint64_t *a = acc + c * (j * nl + l);
                for (size_t q = 0; q < c; q++) {
                    a[q] -= v[q];
                    dd[q] += v[q];
                }
            }
        }
    }
}

/* Receiver (owner): leaves (n, F, nl, 16) with the leaf at b[i, j] unknown (any content),
 * b (n, F) int32 in [0, nl), d (n, F, c) the peer's corrections. acc (F, nl, c) += PRF_ijl for
 * l != b_ij and += d_ij - sum_{l != b_ij} PRF_ijl at l = b_ij. b selects through masks only. */
VEIL_API VEIL_TGT void veil_oh_recv(const uint8_t *leaves, const int32_t *b, const uint64_t *d, size_t n,
                                    size_t F, size_t nl, size_t c, uint64_t tweak, const uint8_t key[16],
                                    uint64_t *acc, uint64_t *buf, uint64_t *r) {
    __m128i rk[11];
    veil_aes128_schedule(key, rk);
    size_t nb = (c + 1) / 2;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < F; j++) {
            veil_oh_prf(leaves + 16 * nl * (i * F + j), nl, nb, tweak, rk, buf);
            uint64_t bb = (uint64_t)(uint32_t)b[i * F + j];
            const uint64_t *dd = d + c * (i * F + j);
            for (size_t q = 0; q < c; q++) r[q] = 0;
            for (size_t l = 0; l < nl; l++) {
                uint64_t diff = (uint64_t)l ^ bb;
                uint64_t keep = (uint64_t)0 - ((diff | ((uint64_t)0 - diff)) >> 63); /* ones iff l != b */
                uint64_t *v = buf + 2 * nb * l;
                for (size_t q = 0; q < c; q++) {
                    v[q] &= keep;
                    r[q] += v[q];
                }
            }
            for (size_t l = 0; l < nl; l++) {
                uint64_t diff = (uint64_t)l ^ bb;
                uint64_t here = ((diff | ((uint64_t)0 - diff)) >> 63) - (uint64_t)1; /* ones iff l == b */
                const uint64_t *v = buf + 2 * nb * l;
                uint64_t *a = acc + c * (j * nl + l);
                for (size_t q = 0; q < c; q++) a[q] += v[q] + ((dd[q] - r[q]) & here);
            }
        }
    }
}
