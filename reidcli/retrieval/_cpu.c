/* The CPU's compiled kernels (module reidcli.retrieval._cpu), each with a torch fallback of the same results.

   1. count_beats — exact positive ranks in one scan per group of positives: the CPU's "scan" counting.
   For a query row with scores s_t (t = 0 … G−1) and positives (v_j, index r_j), the number of items that rank
   before positive j is  #{t : s_t > v_j}  +  #{t < r_j : s_t = v_j}  (stable ties: a smaller gallery row first).
   Scores become order-preserving int32 keys (−0 equal to +0), so that "s ≥ v" is exactly "key > key(v) − 1":
   before row r_j an item counts with ≥, from r_j on with >. The row's positives, sorted by gallery row, go in
   groups of eight; each group scans the row once, in segments between its positives' rows, with eight
   branch-free compare-and-add accumulators that the compiler vectorises (AVX-512, AVX2 or the baseline, chosen
   when the module loads). Work per row: G keys, then G·⌈n/8⌉ eight-way comparisons, all in cache.

   2. jaccard_rows — the re-ranking's sparse join: overlap[i, j] += min(a, b) for every query entry (i, k, a)
   and gallery entry (j, k, b) of the same column k, one query row per pass (its output row stays in cache).

   3. knn_rows / knn_cols — the re-ranking's running k nearest neighbours: a block of distances folded into
   sorted k-lists (and row maxima) along its rows, and along its columns for the rows after the block (the
   matrix is symmetric), with no transposed copy and no top-k sort: sixteen values at a time are compared with
   the list's worst, and the rare smaller one is inserted in place (ties keep the earlier candidate).

   Called from reidcli.retrieval (native.py) with tensors' addresses; the callers check dtypes, shapes and
   contiguity. The GIL is released, so that threads can work on row ranges side by side. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define GROUP 8

static inline int32_t ordered_key(float x) {
    union {
        float f;
        int32_t i;
    } u;
    u.f = x + 0.0f; /* −0 → +0 */
    return u.i >= 0 ? u.i : u.i ^ 0x7FFFFFFF;
}

CLONES static void row_keys(const float *restrict s, int64_t g, int negate, int32_t *restrict keys) {
    if (negate)
        for (int64_t t = 0; t < g; t++) keys[t] = ordered_key(-s[t]);
    else
        for (int64_t t = 0; t < g; t++) keys[t] = ordered_key(s[t]);
}

/* adds to c[j] the keys in [lo, hi) above th[j], for the eight thresholds at once */
CLONES static void count_above(const int32_t *restrict keys, int64_t lo, int64_t hi, const int32_t *restrict th,
                               int64_t *restrict c) {
    const int32_t t0 = th[0], t1 = th[1], t2 = th[2], t3 = th[3], t4 = th[4], t5 = th[5], t6 = th[6], t7 = th[7];
    int32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0, c7 = 0;
    for (int64_t t = lo; t < hi; t++) {
        const int32_t v = keys[t];
        c0 += v > t0;
        c1 += v > t1;
        c2 += v > t2;
        c3 += v > t3;
        c4 += v > t4;
        c5 += v > t5;
        c6 += v > t6;
        c7 += v > t7;
    }
    c[0] += c0, c[1] += c1, c[2] += c2, c[3] += c3, c[4] += c4, c[5] += c5, c[6] += c6, c[7] += c7;
}

typedef struct {
    int64_t row;  /* gallery row */
    int32_t key;  /* order-preserving key of its score */
    int32_t slot; /* column in the output */
} positive_t;

static int by_row(const void *a, const void *b) {
    const int64_t x = ((const positive_t *)a)->row, y = ((const positive_t *)b)->row;
    return (x > y) - (x < y);
}

/* Rows [r0, r1) of scores (Q, G) (negated first when ``negate``: a distance matrix); positives (Q, P) as scores
   (never negated) and gallery rows, the first num_pos[i] of each row valid. out (Q, P): items before each positive,
   0 in the padding. Returns 0, or −1 when memory runs out. */
static int count_rows(const float *scores, int64_t g, int negate, const float *pos_scores, const int64_t *pos_index,
                      const int64_t *num_pos, int64_t p, int64_t r0, int64_t r1, int64_t *out) {
    int32_t *keys = malloc(sizeof(int32_t) * (size_t)(g > 0 ? g : 1));
    positive_t *pos = malloc(sizeof(positive_t) * (size_t)(p > 0 ? p : 1));
    if (!keys || !pos) {
        free(keys);
        free(pos);
        return -1;
    }
    for (int64_t i = r0; i < r1; i++) {
        const int64_t n = num_pos[i] < p ? num_pos[i] : p;
        int64_t *o = out + i * p;
        for (int64_t j = 0; j < p; j++) o[j] = 0;
        if (n <= 0) continue;
        row_keys(scores + i * g, g, negate, keys);
        for (int64_t j = 0; j < n; j++) {
            pos[j].key = ordered_key(pos_scores[i * p + j]);
            pos[j].row = pos_index[i * p + j];
            pos[j].slot = (int32_t)j;
        }
        qsort(pos, (size_t)n, sizeof(positive_t), by_row);
        for (int64_t j0 = 0; j0 < n; j0 += GROUP) {
            const int m = (int)(n - j0 < GROUP ? n - j0 : GROUP);
            int32_t th[GROUP];
            int64_t cnt[GROUP] = {0};
            for (int j = 0; j < GROUP; j++) th[j] = j < m ? pos[j0 + j].key - 1 : INT32_MAX; /* ≥ before its row */
            int64_t lo = 0;
            for (int s = 0; s <= m; s++) {
                int64_t hi = s < m ? pos[j0 + s].row : g;
                hi = hi < lo ? lo : (hi > g ? g : hi);
                if (hi > lo) count_above(keys, lo, hi, th, cnt);
                lo = hi;
                if (s < m) th[s] = pos[j0 + s].key; /* > from its own row on */
            }
            for (int j = 0; j < m; j++) o[pos[j0 + j].slot] = cnt[j];
        }
    }
    free(keys);
    free(pos);
    return 0;
}

static PyObject *count_beats(PyObject *self, PyObject *args) {
    unsigned long long scores, pos_scores, pos_index, num_pos, out;
    long long g, p, r0, r1;
    int negate;
    if (!PyArg_ParseTuple(args, "KLpKKKLLLK", &scores, &g, &negate, &pos_scores, &pos_index, &num_pos, &p, &r0,
                          &r1, &out))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = count_rows((const float *)(uintptr_t)scores, g, negate,
                                           (const float *)(uintptr_t)pos_scores, (const int64_t *)(uintptr_t)pos_index,
                                           (const int64_t *)(uintptr_t)num_pos, p, r0, r1, (int64_t *)(uintptr_t)out);
    Py_END_ALLOW_THREADS if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Query rows [r0, r1): entries q_ptr[i] … q_ptr[i+1] of (q_col, q_val); gallery entries of column k at
   g_ptr[k] … g_ptr[k+1] of (g_row, g_val); out (Q, G) float32, accumulated into. */
static void jaccard_rows(const int64_t *q_ptr, const int64_t *q_col, const float *q_val, const int64_t *g_ptr,
                         const int64_t *g_row, const float *g_val, int64_t g, int64_t r0, int64_t r1, float *out) {
    for (int64_t i = r0; i < r1; i++) {
        float *o = out + i * g;
        for (int64_t e = q_ptr[i]; e < q_ptr[i + 1]; e++) {
            const int64_t k = q_col[e];
            const float a = q_val[e];
            for (int64_t t = g_ptr[k]; t < g_ptr[k + 1]; t++) {
                const float b = g_val[t];
                o[g_row[t]] += a < b ? a : b;
            }
        }
    }
}

static PyObject *jaccard(PyObject *self, PyObject *args) {
    unsigned long long q_ptr, q_col, q_val, g_ptr, g_row, g_val, out;
    long long g, r0, r1;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLK", &q_ptr, &q_col, &q_val, &g_ptr, &g_row, &g_val, &g, &r0, &r1, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS jaccard_rows((const int64_t *)(uintptr_t)q_ptr, (const int64_t *)(uintptr_t)q_col,
                                        (const float *)(uintptr_t)q_val, (const int64_t *)(uintptr_t)g_ptr,
                                        (const int64_t *)(uintptr_t)g_row, (const float *)(uintptr_t)g_val, g, r0, r1,
                                        (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

#define SPAN 16

/* Inserts (v, col) into an ascending k-list whose last value is above v; equal values keep their place first. */
static inline void knn_insert(float *bd, int64_t *bi, int64_t k, float v, int64_t col) {
    int64_t p = k - 1;
    while (p > 0 && bd[p - 1] > v) {
        bd[p] = bd[p - 1];
        bi[p] = bi[p - 1];
        p--;
    }
    bd[p] = v;
    bi[p] = col;
}

/* Block rows [r0, r1) of d (rows ld apart, m values: candidates col0 …) into rows row0 + r of best/knn/row_max. */
CLONES static void knn_fold_rows(const float *d, int64_t ld, int64_t m, int64_t col0, int64_t row0, int64_t k,
                                 float *best, int64_t *knn, float *row_max, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *v = d + r * ld;
        float *bd = best + (row0 + r) * k;
        int64_t *bi = knn + (row0 + r) * k;
        float mx = row_max[row0 + r];
        int64_t t = 0;
        for (; t + SPAN <= m; t += SPAN) {
            float lo = v[t], hi = v[t];
            for (int u = 1; u < SPAN; u++) {
                const float x = v[t + u];
                lo = x < lo ? x : lo;
                hi = x > hi ? x : hi;
            }
            mx = hi > mx ? hi : mx;
            if (lo < bd[k - 1])
                for (int u = 0; u < SPAN; u++)
                    if (v[t + u] < bd[k - 1]) knn_insert(bd, bi, k, v[t + u], col0 + t + u);
        }
        for (; t < m; t++) {
            mx = v[t] > mx ? v[t] : mx;
            if (v[t] < bd[k - 1]) knn_insert(bd, bi, k, v[t], col0 + t);
        }
        row_max[row0 + r] = mx;
    }
}

/* Columns [j0, j1) of d (c rows, ld apart: candidates col0 + r) into rows row0 + j of best/knn/row_max. */
CLONES static int knn_fold_cols(const float *d, int64_t ld, int64_t c, int64_t col0, int64_t row0, int64_t k,
                                float *best, int64_t *knn, float *row_max, int64_t j0, int64_t j1) {
    const int64_t w = j1 - j0;
    float *thr = malloc(sizeof(float) * (size_t)(w > 0 ? w : 1)); /* each column's list worst, contiguous */
    if (!thr) return -1;
    for (int64_t j = 0; j < w; j++) thr[j] = best[(row0 + j0 + j) * k + k - 1];
    float *mx = row_max + row0 + j0;
    for (int64_t r = 0; r < c; r++) {
        const float *v = d + r * ld + j0;
        for (int64_t t = 0; t < w; t += SPAN) {
            const int64_t e = t + SPAN < w ? t + SPAN : w;
            int any = 0;
            for (int64_t j = t; j < e; j++) {
                mx[j] = v[j] > mx[j] ? v[j] : mx[j];
                any |= v[j] < thr[j];
            }
            if (any)
                for (int64_t j = t; j < e; j++)
                    if (v[j] < thr[j]) {
                        float *bd = best + (row0 + j0 + j) * k;
                        knn_insert(bd, knn + (row0 + j0 + j) * k, k, v[j], col0 + r);
                        thr[j] = bd[k - 1];
                    }
        }
    }
    free(thr);
    return 0;
}

static PyObject *knn(PyObject *self, PyObject *args) {
    unsigned long long d, best, knn_idx, row_max;
    long long ld, m, col0, row0, k, a0, a1;
    int cols;
    if (!PyArg_ParseTuple(args, "pKLLLLLKKKLL", &cols, &d, &ld, &m, &col0, &row0, &k, &best, &knn_idx, &row_max,
                          &a0, &a1))
        return NULL;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS if (cols) rc =
        knn_fold_cols((const float *)(uintptr_t)d, ld, m, col0, row0, k, (float *)(uintptr_t)best,
                      (int64_t *)(uintptr_t)knn_idx, (float *)(uintptr_t)row_max, a0, a1);
    else knn_fold_rows((const float *)(uintptr_t)d, ld, m, col0, row0, k, (float *)(uintptr_t)best,
                       (int64_t *)(uintptr_t)knn_idx, (float *)(uintptr_t)row_max, a0, a1);
    Py_END_ALLOW_THREADS if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"count_beats", count_beats, METH_VARARGS,
     "count_beats(scores, G, negate, pos_scores, pos_index, num_pos, P, r0, r1, out): addresses of contiguous "
     "float32 (Q, G), float32 (Q, P), int64 (Q, P), int64 (Q,) and int64 (Q, P) out; rows r0..r1."},
    {"jaccard_rows", jaccard, METH_VARARGS,
     "jaccard_rows(q_ptr, q_col, q_val, g_ptr, g_row, g_val, G, r0, r1, out): addresses of int64 (Q+1,), int64, "
     "float32 query entries by row, int64 (N+1,), int64, float32 gallery entries by column, float32 (Q, G) out."},
    {"knn_fold", knn, METH_VARARGS,
     "knn_fold(cols, d, ld, m, col0, row0, k, best, knn, row_max, a0, a1): a float32 block of distances (rows ld "
     "apart) folded into ascending float32 (N, k) best, int64 (N, k) knn and float32 (N,) row_max: along block rows "
     "a0..a1 (m values each, candidates col0 …) into rows row0 + r, or with cols along columns a0..a1 (m rows, "
     "candidates col0 + r) into rows row0 + j."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "The CPU's compiled retrieval kernels.", -1, methods};

/* Raised whenever a function's arguments change: native.py ignores a module built from older source. */
#define CPU_KERNELS_ABI 1

PyMODINIT_FUNC PyInit__cpu(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI", CPU_KERNELS_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
