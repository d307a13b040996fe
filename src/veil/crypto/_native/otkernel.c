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

static inline uint64_t veil_eq_mask(uint64_t x, uint64_t y) { /* all ones iff x == y, no branch */
    uint64_t diff = x ^ y;
    return ((diff | ((uint64_t)0 - diff)) >> 63) - (uint64_t)1;
}

/* One pass over all (row, feature, leaf, block) PRF evaluations, 8 AES blocks in flight, each
 * 16-byte output (two ring elements) added to its bucket accumulator and to its (row, feature)
 * sum as one 128-bit vector. recv selects the role (public). Scratch: acc (F, nl, nb) and
 * sum (F, nb) vectors, nb = ceil(c / 2); for odd c the upper lane of the last block is unused. */
typedef struct {
    int recv;
    const uint8_t *leaves;
    const int32_t *b;
    const uint64_t *x;
    uint64_t *d;
    size_t n, F, nl, c, nb;
    uint64_t tweak;
    __m128i rk[11];
    __m128i *acc; /* (F, nl, nb) */
    __m128i *sum; /* (F, nb) */
} veil_oh_ctx;

VEIL_TGT static inline void veil_oh_flush(veil_oh_ctx *cx, __m128i *bl, const __m128i *y, const size_t *ai,
                                          const size_t *si, const __m128i *keep, int m) {
    if (m == 8)
        veil_aes_n(bl, 8, cx->rk);
    else
        veil_aes_n(bl, m, cx->rk);
    for (int q = 0; q < m; q++) {
        __m128i out = _mm_xor_si128(bl[q], y[q]);
        if (cx->recv) {
            out = _mm_and_si128(out, keep[q]);
            cx->acc[ai[q]] = _mm_add_epi64(cx->acc[ai[q]], out);
        } else {
            cx->acc[ai[q]] = _mm_sub_epi64(cx->acc[ai[q]], out);
        }
        cx->sum[si[q]] = _mm_add_epi64(cx->sum[si[q]], out);
    }
}

static inline __m128i veil_oh_load(const uint64_t *p, size_t k, size_t c) {
    return _mm_set_epi64x((long long)(2 * k + 1 < c ? p[2 * k + 1] : 0), (long long)p[2 * k]);
}

VEIL_TGT static void veil_oh_pass(veil_oh_ctx *cx) {
    const size_t F = cx->F, nl = cx->nl, nb = cx->nb, c = cx->c;
    for (size_t t = 0; t < F * nl * nb; t++) cx->acc[t] = _mm_setzero_si128();
    __m128i bl[8], y[8], keep[8];
    size_t ai[8], si[8];
    for (size_t i = 0; i < cx->n; i++) {
        for (size_t j = 0; j < F; j++)
            for (size_t k = 0; k < nb; k++)
                cx->sum[j * nb + k] = cx->recv ? _mm_setzero_si128() : veil_oh_load(cx->x + i * c, k, c);
        int m = 0;
        for (size_t j = 0; j < F; j++) {
            const uint8_t *lv = cx->leaves + 16 * nl * (i * F + j);
            uint64_t bb = cx->recv ? (uint64_t)(uint32_t)cx->b[i * F + j] : ~(uint64_t)0;
            for (size_t l = 0; l < nl; l++) {
                __m128i leaf = _mm_loadu_si128((const __m128i *)(lv + 16 * l));
                __m128i kp = _mm_set1_epi64x((long long)~veil_eq_mask(l, bb)); /* ones iff l != b */
                for (size_t k = 0; k < nb; k++) {
                    y[m] = _mm_xor_si128(leaf, _mm_set_epi64x((long long)cx->tweak, (long long)k));
                    bl[m] = y[m];
                    ai[m] = (j * nl + l) * nb + k;
                    si[m] = j * nb + k;
                    keep[m] = kp;
                    if (++m == 8) {
                        veil_oh_flush(cx, bl, y, ai, si, keep, 8);
                        m = 0;
                    }
                }
            }
        }
        if (m) veil_oh_flush(cx, bl, y, ai, si, keep, m);
        for (size_t j = 0; j < F; j++) {
            if (!cx->recv) { /* d = x_i + sum_l PRF */
                uint64_t *dd = cx->d + c * (i * F + j);
                for (size_t k = 0; k < nb; k++) {
                    uint64_t pair[2];
                    _mm_storeu_si128((__m128i *)pair, cx->sum[j * nb + k]);
                    dd[2 * k] = pair[0];
                    if (2 * k + 1 < c) dd[2 * k + 1] = pair[1];
                }
                continue;
            }
            /* owner: acc[b] += d - sum_{l != b} PRF, through an all-ones mask at l = b */
            uint64_t bb = (uint64_t)(uint32_t)cx->b[i * F + j];
            const uint64_t *dd = cx->d + c * (i * F + j);
            for (size_t l = 0; l < nl; l++) {
                __m128i here = _mm_set1_epi64x((long long)veil_eq_mask(l, bb)); /* ones iff l == b */
                for (size_t k = 0; k < nb; k++) {
                    __m128i corr = _mm_sub_epi64(veil_oh_load(dd, k, c), cx->sum[j * nb + k]);
                    size_t a = (j * nl + l) * nb + k;
                    cx->acc[a] = _mm_add_epi64(cx->acc[a], _mm_and_si128(corr, here));
                }
            }
        }
    }
}

/* Both roles: key schedule, scratch layout, the pass, then acc (F, nl, c) uint64 from the
 * (F, nl, nb) vectors. cx holds the role and the sizes; the rest is filled in here. */
VEIL_TGT static void veil_oh_run(veil_oh_ctx *cx, const uint8_t key[16], uint64_t *acc, uint64_t *scratch) {
    cx->nb = (cx->c + 1) / 2;
    veil_aes128_schedule(key, cx->rk);
    cx->acc = (__m128i *)scratch;
    cx->sum = cx->acc + cx->F * cx->nl * cx->nb;
    veil_oh_pass(cx);
    for (size_t g = 0; g < cx->F * cx->nl; g++)
        memcpy(acc + cx->c * g, (const uint64_t *)(cx->acc + cx->nb * g), 8 * cx->c);
}

/* Sender (non-owner): leaves (n, F, nl, 16), x (n, c) its share. d (n, F, c) = x_i + sum_l PRF_ijl;
 * acc (F, nl, c) = -sum_i PRF_ijl. scratch: F * nl * nb + F * nb 16-byte vectors (16-aligned). */
VEIL_API VEIL_TGT void veil_oh_send(const uint8_t *leaves, const uint64_t *x, size_t n, size_t F, size_t nl,
                                    size_t c, uint64_t tweak, const uint8_t key[16], uint64_t *d,
                                    uint64_t *acc, uint64_t *scratch) {
    veil_oh_ctx cx = {.recv = 0, .leaves = leaves, .x = x, .d = d, .n = n, .F = F, .nl = nl, .c = c,
                      .tweak = tweak};
    veil_oh_run(&cx, key, acc, scratch);
}

/* Receiver (owner): leaves (n, F, nl, 16) with the leaf at b[i, j] unknown (any content),
 * b (n, F) int32 in [0, nl), d (n, F, c) the peer's corrections. acc (F, nl, c) = sum over rows of
 * PRF_ijl for l != b_ij and of d_ij - sum_{l != b_ij} PRF_ijl at l = b_ij. b selects through masks
 * only. scratch as for veil_oh_send. */
VEIL_API VEIL_TGT void veil_oh_recv(const uint8_t *leaves, const int32_t *b, const uint64_t *d, size_t n,
                                    size_t F, size_t nl, size_t c, uint64_t tweak, const uint8_t key[16],
                                    uint64_t *acc, uint64_t *scratch) {
    veil_oh_ctx cx = {.recv = 1, .leaves = leaves, .b = b, .d = (uint64_t *)d, .n = n, .F = F, .nl = nl,
                      .c = c, .tweak = tweak};
    veil_oh_run(&cx, key, acc, scratch);
}

/* ---------------------------------------------------------------- GGM trees of the one-hot set-up */

/* nxt[2p + beta] = MMO(cur[p] ^ C_beta), C_beta = (lo beta, hi 2^64 - 1), for p < width */
VEIL_TGT static void veil_ggm_level(const __m128i *cur, __m128i *nxt, size_t width, const __m128i rk[11]) {
    const __m128i c0 = _mm_set_epi64x(-1, 0), c1 = _mm_set_epi64x(-1, 1);
    __m128i y[8], b[8];
    for (size_t p0 = 0; p0 < width; p0 += 4) {
        int np = width - p0 >= 4 ? 4 : (int)(width - p0);
        for (int q = 0; q < np; q++) {
            y[2 * q] = _mm_xor_si128(cur[p0 + q], c0);
            y[2 * q + 1] = _mm_xor_si128(cur[p0 + q], c1);
            b[2 * q] = y[2 * q];
            b[2 * q + 1] = y[2 * q + 1];
        }
        if (np == 4)
            veil_aes_n(b, 8, rk);
        else
            veil_aes_n(b, 2 * np, rk);
        for (int q = 0; q < 2 * np; q++) nxt[2 * p0 + q] = _mm_xor_si128(b[q], y[q]);
    }
}

/* Sender: roots (m, 16) -> the first `keep` of 2^depth leaves (m, keep, 16) and the XOR of the
 * left / right children of every level (m, depth, 2, 16). scratch: 2 * 2^depth 16-byte vectors,
 * 16-byte aligned. Equal to onehot.ggm_expand. */
VEIL_API VEIL_TGT void veil_ggm_expand(const uint8_t *roots, size_t m, size_t depth, size_t keep,
                                       const uint8_t key[16], uint8_t *leaves, uint8_t *sums, uint8_t *scratch) {
    __m128i rk[11];
    veil_aes128_schedule(key, rk);
    __m128i *bufa = (__m128i *)scratch, *bufb = bufa + ((size_t)1 << depth);
    for (size_t r = 0; r < m; r++) {
        __m128i *cur = bufa, *nxt = bufb;
        cur[0] = _mm_loadu_si128((const __m128i *)(roots + 16 * r));
        size_t width = 1;
        for (size_t lev = 0; lev < depth; lev++) {
            veil_ggm_level(cur, nxt, width, rk);
            __m128i xl = _mm_setzero_si128(), xr = _mm_setzero_si128();
            for (size_t p = 0; p < width; p++) {
                xl = _mm_xor_si128(xl, nxt[2 * p]);
                xr = _mm_xor_si128(xr, nxt[2 * p + 1]);
            }
            _mm_storeu_si128((__m128i *)(sums + 32 * (r * depth + lev)), xl);
            _mm_storeu_si128((__m128i *)(sums + 32 * (r * depth + lev) + 16), xr);
            __m128i *t = cur;
            cur = nxt;
            nxt = t;
            width *= 2;
        }
        memcpy(leaves + 16 * keep * r, cur, 16 * keep);
    }
}

/* Owner: every leaf but alpha (zeros there) from got (m, depth, 16), the peer's XOR of the side off
 * the path at each level. The path only selects through masks (no branch, no index on alpha).
 * Equal to onehot.ggm_punctured. scratch as for veil_ggm_expand. */
VEIL_API VEIL_TGT void veil_ggm_punctured(const int32_t *alpha, const uint8_t *got, size_t m, size_t depth,
                                          size_t keep, const uint8_t key[16], uint8_t *leaves,
                                          uint8_t *scratch) {
    __m128i rk[11];
    veil_aes128_schedule(key, rk);
    __m128i *bufa = (__m128i *)scratch, *bufb = bufa + ((size_t)1 << depth);
    for (size_t r = 0; r < m; r++) {
        __m128i *cur = bufa, *nxt = bufb;
        cur[0] = _mm_setzero_si128(); /* the root is unknown */
        size_t width = 1;
        uint64_t path = 0, al = (uint64_t)(uint32_t)alpha[r];
        for (size_t lev = 0; lev < depth; lev++) {
            uint64_t a = (al >> (depth - 1 - lev)) & 1;
            veil_ggm_level(cur, nxt, width, rk);
            __m128i xl = _mm_setzero_si128(), xr = _mm_setzero_si128();
            for (size_t p = 0; p < width; p++) { /* children of the unknown node are garbage: zero */
                __m128i mp = _mm_set1_epi64x((long long)veil_eq_mask(p, path));
                nxt[2 * p] = _mm_andnot_si128(mp, nxt[2 * p]);
                nxt[2 * p + 1] = _mm_andnot_si128(mp, nxt[2 * p + 1]);
                xl = _mm_xor_si128(xl, nxt[2 * p]);
                xr = _mm_xor_si128(xr, nxt[2 * p + 1]);
            }
            /* off-path side s = 1 - a: XOR of its known children (right ones when a = 0) */
            __m128i sa = _mm_set1_epi64x((long long)veil_eq_mask(a, 1));
            __m128i off = _mm_or_si128(_mm_and_si128(sa, xl), _mm_andnot_si128(sa, xr));
            __m128i val = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(got + 16 * (r * depth + lev))), off);
            uint64_t target = 2 * path + (1 - a);
            for (size_t q = 0; q < 2 * width; q++) {
                __m128i mq = _mm_set1_epi64x((long long)veil_eq_mask(q, target));
                nxt[q] = _mm_or_si128(_mm_andnot_si128(mq, nxt[q]), _mm_and_si128(mq, val));
            }
            path = 2 * path + a;
            __m128i *t = cur;
            cur = nxt;
            nxt = t;
            width *= 2;
        }
        memcpy(leaves + 16 * keep * r, cur, 16 * keep);
    }
}
