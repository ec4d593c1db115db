/* dict_ops.c: the SharedDict operations: lock-free reads, writes under the
 * lock, growth and compaction (layout: dict.h). */
#include "dict.h"

/* --- lock-free reads ------------------------------------------------------ */

/* Read the value of `key` without the lock.  Returns a new reference, or
 * `missing` (borrowed, increfed) when absent. */
static PyObject *
read_value(MappingObject *m, const char *key, uint64_t klen, uint64_t h, PyObject *missing, int locked)
{
    for (int attempt = 0;; attempt++) {
        if (locked && attempt > 0)
            return corrupt("index");
        if (attempt == READ_RETRIES) {
            /* Writers keep replacing the region under us: read under the
             * lock instead, where nothing moves. */
            int took;
            if (dict_enter(m, -1, &took, NULL) < 0)
                return NULL;
            PyObject *res = read_value(m, key, klen, h, missing, 1);
            dict_exit(m, took);
            return res;
        }
        if (attempt > 10)
            sched_yield();
        uint64_t g1 = ld_acq(m, H_GEN);
        uint64_t fs = file_size(m);
        Region r;
        uint64_t pos, e, v = 0, n = 0;
        if (region_load(m, fs, &r) < 0)
            continue;
        int st = probe(m, &r, fs, h, key, klen, &pos, &e);
        if (st < 0)
            continue;
        if (st == 1) {
            v = ld_acq(m, r.ent + e * ENTRY + 16);
            if (v != 0 && !(v & 1) && !block_in(m, v, r.heap, r.off + r.size, &n))
                continue;
        }
        /* Everything above was read from one layout iff gen did not move. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (ld_rlx(m, H_GEN) != g1)
            continue;
        if (st == 0 || v == 0) {
            Py_INCREF(missing);
            return missing;
        }
        if (v & 1)
            return inline_int(v);
        Copy c;
        c.n = n;
        c.p = n <= sizeof(c.small) ? c.small : PyMem_Malloc((size_t)n);
        if (c.p == NULL)
            return PyErr_NoMemory();
        memcpy(c.p, m->addr + v + 8, (size_t)n);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (ld_rlx(m, H_GEN) != g1) {
            copy_free(&c);
            continue;
        }
        PyObject *res = decode_value(c.p, c.n);
        copy_free(&c);
        return res;
    }
}

static int
key_arg(PyObject *obj, const char **key, Py_ssize_t *klen)
{
    if (!PyBytes_CheckExact(obj)) {
        PyErr_SetString(PyExc_TypeError, "encoded key must be bytes");
        return -1;
    }
    *key = PyBytes_AS_STRING(obj);
    *klen = PyBytes_GET_SIZE(obj);
    return 0;
}

/* dict_get(m, key, missing) -> value or missing. */
static PyObject *
dict_get_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t klen;
    if (check_nargs("dict_get", nargs, 3, 3) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL || key_arg(args[1], &key, &klen) < 0)
        return NULL;
    return read_value(m, key, (uint64_t)klen, xxh64(key, (size_t)klen, 0), args[2], held_by_me(m));
}
OP_WRAPPER(dict_get, 1)

static PyObject *
dict_len_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_len", nargs, 1, 1) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    for (int attempt = 0;; attempt++) {
        if (attempt == READ_RETRIES)
            return corrupt("region descriptor");
        uint64_t g1 = ld_acq(m, H_GEN);
        Region r;
        if (region_load(m, file_size(m), &r) < 0)
            continue;
        uint64_t n = ld_acq(m, r.off + R_COUNT);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (ld_rlx(m, H_GEN) == g1) {
            if (n > r.ecap)  /* more live entries than the region has room for */
                return corrupt("entry count");
            return PyLong_FromUnsignedLongLong(n);
        }
    }
}
OP_WRAPPER(dict_len, 1)

/* Copy a block's bytes into a new bytes object (or NULL with *bad set). */
static PyObject *
block_bytes(MappingObject *m, const Region *r, uint64_t ref, int *bad)
{
    uint64_t n;
    if (!block_in(m, ref, r->heap, r->off + r->size, &n)) {
        *bad = 1;
        return NULL;
    }
    return PyBytes_FromStringAndSize(m->addr + ref + 8, (Py_ssize_t)n);
}

/* dict_items(m, what) -> list in insertion order: what=0 encoded keys,
 * 1 values, 2 (encoded key, value) pairs.  Lock-free; each entry is read
 * whole, and the list is retried if the layout changed while reading.  Not
 * one snapshot when others write meanwhile (entries are read at different
 * instants); under the lock it is one. */
static PyObject *
dict_items_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_items", nargs, 2, 2) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    long what = PyLong_AsLong(args[1]);
    if (what == -1 && PyErr_Occurred())
        return NULL;
    for (int attempt = 0;; attempt++) {
        int took = 0;
        if (attempt == READ_RETRIES && dict_enter(m, -1, &took, NULL) < 0)
            return NULL;
        if (attempt > 10 && !took)
            sched_yield();
        uint64_t g1 = ld_acq(m, H_GEN), fs = file_size(m);
        Region r;
        PyObject *out = PyList_New(0);
        if (out == NULL) {
            dict_exit(m, took);
            return NULL;
        }
        int bad = region_load(m, fs, &r) < 0;
        uint64_t nent = bad ? 0 : ld_acq(m, r.off + R_NENTRIES);
        if (!bad && nent > r.ecap)
            bad = 1;
        for (uint64_t e = 0; !bad && e < nent; e++) {
            uint64_t eo = r.ent + e * ENTRY;
            uint64_t v = ld_acq(m, eo + 16);
            if (v == 0)
                continue;
            PyObject *k = NULL, *raw = NULL, *item;
            if (what != 1 && (k = block_bytes(m, &r, ld_rlx(m, eo + 8), &bad)) == NULL)
                goto item_failed;
            if (what != 0) {
                raw = (v & 1) ? PyLong_FromUnsignedLongLong(v) : block_bytes(m, &r, v, &bad);
                if (raw == NULL)
                    goto item_failed;
            }
            item = what == 0 ? k : what == 1 ? raw : PyTuple_Pack(2, k, raw);
            if (item == NULL)
                goto item_failed;
            int appended = PyList_Append(out, item);
            if (what == 2)
                Py_DECREF(item);
            if (appended < 0)
                goto item_failed;
            Py_XDECREF(k);
            Py_XDECREF(raw);
            continue;
        item_failed:
            Py_XDECREF(k);
            Py_XDECREF(raw);
            if (!bad) {  /* a real error (memory) */
                Py_DECREF(out);
                dict_exit(m, took);
                return NULL;
            }
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        dict_exit(m, took);
        if (bad || ld_rlx(m, H_GEN) != g1) {
            Py_DECREF(out);
            if (took)
                return corrupt("entries");
            continue;
        }
        /* Consistent copies: decode the values now. */
        if (what != 0) {
            Py_ssize_t n = PyList_GET_SIZE(out);
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *item = PyList_GET_ITEM(out, i);
                PyObject *raw = what == 1 ? item : PyTuple_GET_ITEM(item, 1);
                PyObject *val;
                if (PyLong_CheckExact(raw))
                    val = inline_int(PyLong_AsUnsignedLongLong(raw));
                else
                    val = decode_value(PyBytes_AS_STRING(raw), (uint64_t)PyBytes_GET_SIZE(raw));
                if (val == NULL) {
                    Py_DECREF(out);
                    return NULL;
                }
                if (what == 1) {
                    PyList_SET_ITEM(out, i, val);
                    Py_DECREF(raw);
                } else {
                    PyObject *pair = PyTuple_Pack(2, PyTuple_GET_ITEM(item, 0), val);
                    Py_DECREF(val);
                    if (pair == NULL) {
                        Py_DECREF(out);
                        return NULL;
                    }
                    PyList_SET_ITEM(out, i, pair);
                    Py_DECREF(item);
                }
            }
        }
        return out;
    }
}
OP_WRAPPER(dict_items, 1)

/* --- writes (under the lock) ---------------------------------------------- */


static int
value_arg(PyObject *obj, NewValue *nv)
{
    nv->word = 0;
    if (PyLong_CheckExact(obj)) {
        long long x = PyLong_AsLongLong(obj);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (x < INLINE_MIN || x > INLINE_MAX) {
            PyErr_SetString(PyExc_OverflowError, "int too large to store inline");
            return -1;
        }
        nv->word = ((uint64_t)x << 1) | 1;
        return 0;
    }
    if (!PyBytes_CheckExact(obj) || PyBytes_GET_SIZE(obj) == 0) {
        PyErr_SetString(PyExc_TypeError, "encoded value must be an int or non-empty bytes");
        return -1;
    }
    nv->data = PyBytes_AS_STRING(obj);
    nv->len = (uint64_t)PyBytes_GET_SIZE(obj);
    return 0;
}

static inline uint64_t block_size(uint64_t n) { return 8 + pad8(n); }

/* Write a block at *top (space already checked) and return its offset. */
static uint64_t
put_block(MappingObject *m, uint64_t *top, const char *data, uint64_t n)
{
    uint64_t off = *top;
    st_rlx(m, off, n);
    memcpy(m->addr + off + 8, data, (size_t)n);
    *top += block_size(n);
    return off;
}

enum { PUT_OK = 0, PUT_NOSPACE = 1 };

/* Store key -> value.  Lock held.  Returns PUT_OK, PUT_NOSPACE (nothing
 * changed; the caller grows the dict and retries) or -1. */
static int
put_locked(MappingObject *m, const char *key, uint64_t klen, uint64_t h, const NewValue *nv, int *inserted)
{
    uint64_t fs = file_size(m);
    Region r;
    uint64_t pos, e;
    if (region_load(m, fs, &r) < 0) {
        corrupt("current region");
        return -1;
    }
    int st = probe(m, &r, fs, h, key, klen, &pos, &e);
    if (st < 0) {
        corrupt("index");
        return -1;
    }
    uint64_t top = ld_rlx(m, r.off + R_HEAP_TOP), end = r.off + r.size;
    uint64_t nent = ld_rlx(m, r.off + R_NENTRIES);
    if (nent > r.ecap || top < r.heap || top > end || (top & 7)) {
        corrupt("region counters");
        return -1;
    }
    uint64_t old = st == 1 ? ld_rlx(m, r.ent + e * ENTRY + 16) : 0;
    uint64_t need = nv->word ? 0 : block_size(nv->len);
    if (st == 0)
        need += block_size(klen);
    if (need > end - top)
        return PUT_NOSPACE;
    if (old == 0 && nent >= r.ecap)
        return PUT_NOSPACE;
    uint64_t word = nv->word ? nv->word : put_block(m, &top, nv->data, nv->len);
    *inserted = old == 0;
    if (old != 0) {
        /* Live key: replace the value with one atomic store. */
        st_rlx(m, r.off + R_HEAP_TOP, top);
        st_rel(m, r.ent + e * ENTRY + 16, word);
        return PUT_OK;
    }
    /* New or deleted key: append an entry (insertion order, as dict), then
     * publish it through the index slot, then count it. */
    uint64_t kref = st == 1 ? ld_rlx(m, r.ent + e * ENTRY + 8) : put_block(m, &top, key, klen);
    uint64_t eo = r.ent + nent * ENTRY;
    st_rlx(m, r.off + R_HEAP_TOP, top);
    st_rlx(m, eo, h);
    st_rlx(m, eo + 8, kref);
    st_rlx(m, eo + 16, word);
    st_rel(m, r.idx + pos * 8, nent + 1);
    st_rel(m, r.off + R_NENTRIES, nent + 1);
    st_rel(m, r.off + R_COUNT, ld_rlx(m, r.off + R_COUNT) + 1);
    return PUT_OK;
}

/* dict_put(m, key, value) -> bool.
 * False: not enough room (grow and retry). */
static PyObject *
dict_put_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t klen;
    NewValue nv;
    int took, inserted = 0;
    if (check_nargs("dict_put", nargs, 3, 3) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL || key_arg(args[1], &key, &klen) < 0 || value_arg(args[2], &nv) < 0)
        return NULL;
    uint64_t h = xxh64(key, (size_t)klen, 0);
    if (dict_enter(m, -1, &took, NULL) < 0)
        return NULL;
    int st = put_locked(m, key, (uint64_t)klen, h, &nv, &inserted);
    dict_exit(m, took);
    if (st < 0)
        return NULL;
    return PyBool_FromLong(st == PUT_OK);
}
OP_WRAPPER(dict_put, 1)

/* dict_incr(m, key, n, default) -> the new value, or None when the fast
 * path does not apply (the value is not an inline int, the result would
 * not fit, or the dict must grow); the caller then does it the slow way. */
static PyObject *
dict_incr_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t klen;
    int took, inserted;
    if (check_nargs("dict_incr", nargs, 4, 4) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL || key_arg(args[1], &key, &klen) < 0)
        return NULL;
    if (!PyLong_CheckExact(args[2]) || !PyLong_CheckExact(args[3]))
        Py_RETURN_NONE;
    int ovf;
    long long n = PyLong_AsLongLongAndOverflow(args[2], &ovf);
    if (ovf || (n == -1 && PyErr_Occurred()) || n < INLINE_MIN || n > INLINE_MAX) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    long long dflt = PyLong_AsLongLongAndOverflow(args[3], &ovf);
    if (ovf || (dflt == -1 && PyErr_Occurred()) || dflt < INLINE_MIN || dflt > INLINE_MAX) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    uint64_t h = xxh64(key, (size_t)klen, 0);
    if (dict_enter(m, -1, &took, NULL) < 0)
        return NULL;
    PyObject *res = NULL;
    uint64_t fs = file_size(m);
    Region r;
    uint64_t pos, e;
    if (region_load(m, fs, &r) < 0) {
        corrupt("current region");
        goto done;
    }
    int st = probe(m, &r, fs, h, key, (uint64_t)klen, &pos, &e);
    if (st < 0) {
        corrupt("index");
        goto done;
    }
    uint64_t vo = r.ent + e * ENTRY + 16;
    uint64_t old = st == 1 ? ld_rlx(m, vo) : 0;
    long long base;
    if (old == 0)
        base = dflt;
    else if (old & 1)
        base = (int64_t)old >> 1;
    else {  /* a float, a big int, anything else: the slow path */
        res = Py_None;
        Py_INCREF(res);
        goto done;
    }
    long long nv = base + n;  /* both within +-2**62: no C overflow */
    if (nv < INLINE_MIN || nv > INLINE_MAX) {
        res = Py_None;
        Py_INCREF(res);
        goto done;
    }
    uint64_t word = ((uint64_t)nv << 1) | 1;
    if (old != 0) {
        st_rel(m, vo, word);
    } else {
        NewValue v = {word, NULL, 0};
        int rc = put_locked(m, key, (uint64_t)klen, h, &v, &inserted);
        if (rc < 0)
            goto done;
        if (rc == PUT_NOSPACE) {
            res = Py_None;
            Py_INCREF(res);
            goto done;
        }
    }
    res = PyLong_FromLongLong(nv);
done:
    dict_exit(m, took);
    return res;
}
OP_WRAPPER(dict_incr, 1)

/* The removed value, copied out of shared memory under the lock: an inline
 * word, or the block's encoded bytes.  It is decoded only after the entry
 * is removed (and the lock released, when the call took it): decoding can
 * run user code (unpickling), which may write to this dict and replace the
 * region the removal would have been stored into. */
static PyObject *
raw_value_locked(MappingObject *m, const Region *r, uint64_t v)
{
    if (v & 1)
        return PyLong_FromUnsignedLongLong(v);
    int bad = 0;
    PyObject *raw = block_bytes(m, r, v, &bad);
    if (raw == NULL && bad)
        corrupt("value block");
    return raw;
}

static PyObject *
decode_raw(PyObject *raw)
{
    if (PyLong_CheckExact(raw))
        return inline_int(PyLong_AsUnsignedLongLong(raw));
    return decode_value(PyBytes_AS_STRING(raw), (uint64_t)PyBytes_GET_SIZE(raw));
}

/* dict_delete(m, key, missing, want=True) -> the removed value (True when
 * not `want`: it is not decoded), or missing.  The entry is removed before
 * its value is decoded: if decoding raises, the entry is gone. */
static PyObject *
dict_delete_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    const char *key;
    Py_ssize_t klen;
    int took;
    if (check_nargs("dict_delete", nargs, 3, 4) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL || key_arg(args[1], &key, &klen) < 0)
        return NULL;
    int want = 1;
    if (nargs > 3 && (want = PyObject_IsTrue(args[3])) < 0)
        return NULL;
    uint64_t h = xxh64(key, (size_t)klen, 0);
    if (dict_enter(m, -1, &took, NULL) < 0)
        return NULL;
    PyObject *res = NULL, *raw = NULL;
    uint64_t fs = file_size(m);
    Region r;
    uint64_t pos, e;
    if (region_load(m, fs, &r) < 0) {
        corrupt("current region");
        goto done;
    }
    int st = probe(m, &r, fs, h, key, (uint64_t)klen, &pos, &e);
    if (st < 0) {
        corrupt("index");
        goto done;
    }
    uint64_t vo = r.ent + e * ENTRY + 16;
    uint64_t old = st == 1 ? ld_rlx(m, vo) : 0;
    if (old == 0) {
        res = args[2];
        Py_INCREF(res);
        goto done;
    }
    if (want && (raw = raw_value_locked(m, &r, old)) == NULL)
        goto done;
    uint64_t count = ld_rlx(m, r.off + R_COUNT);
    if (count == 0 || count > r.ecap) {
        Py_CLEAR(raw);
        corrupt("entry count");
        goto done;
    }
    st_rel(m, vo, 0);
    st_rel(m, r.off + R_COUNT, count - 1);
    if (!want) {
        res = Py_True;
        Py_INCREF(res);
    }
done:
    dict_exit(m, took);
    if (raw != NULL) {
        res = decode_raw(raw);
        Py_DECREF(raw);
    }
    return res;
}
OP_WRAPPER(dict_delete, 1)

/* dict_popitem(m) -> (encoded key, value) of the last inserted live entry,
 * removed (before its value is decoded, as dict_delete); or None when
 * empty. */
static PyObject *
dict_popitem_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    int took;
    if (check_nargs("dict_popitem", nargs, 1, 1) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL || dict_enter(m, -1, &took, NULL) < 0)
        return NULL;
    PyObject *res = NULL, *k = NULL, *raw = NULL;
    uint64_t fs = file_size(m);
    Region r;
    if (region_load(m, fs, &r) < 0) {
        corrupt("current region");
        goto done;
    }
    uint64_t nent = ld_rlx(m, r.off + R_NENTRIES);
    if (nent > r.ecap) {
        corrupt("entry count");
        goto done;
    }
    for (uint64_t e = nent; e-- > 0;) {
        uint64_t eo = r.ent + e * ENTRY, v = ld_rlx(m, eo + 16);
        if (v == 0)
            continue;
        int bad = 0;
        k = block_bytes(m, &r, ld_rlx(m, eo + 8), &bad);
        if (k == NULL) {
            if (bad)
                corrupt("key block");
            goto done;
        }
        if ((raw = raw_value_locked(m, &r, v)) == NULL)
            goto done;
        uint64_t count = ld_rlx(m, r.off + R_COUNT);
        if (count == 0 || count > r.ecap) {
            Py_CLEAR(k);
            Py_CLEAR(raw);
            corrupt("entry count");
            goto done;
        }
        st_rel(m, eo + 16, 0);
        st_rel(m, r.off + R_COUNT, count - 1);
        goto done;
    }
    res = Py_None;
    Py_INCREF(res);
done:
    dict_exit(m, took);
    if (k != NULL && raw != NULL) {
        PyObject *val = decode_raw(raw);
        if (val != NULL) {
            res = PyTuple_Pack(2, k, val);
            Py_DECREF(val);
        }
    }
    Py_XDECREF(k);
    Py_XDECREF(raw);
    return res;
}
OP_WRAPPER(dict_popitem, 1)

/* --- growth and compaction ------------------------------------------------ */

/* dict_stats(m) -> (file_size, region_off, region_size, live, live_bytes).
 * Lock held. live_bytes: heap bytes the live keys and values need. */
static PyObject *
dict_stats_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_stats", nargs, 1, 1) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    if (!held_by_me(m)) {
        PyErr_SetString(PyExc_RuntimeError, "dict_stats needs the lock");
        return NULL;
    }
    uint64_t fs = file_size(m);
    Region r;
    if (region_load(m, fs, &r) < 0)
        return corrupt("current region");
    uint64_t nent = ld_rlx(m, r.off + R_NENTRIES), live = 0, bytes = 0, end = r.off + r.size;
    if (nent > r.ecap)
        return corrupt("entry count");
    for (uint64_t e = 0; e < nent; e++) {
        uint64_t eo = r.ent + e * ENTRY, v = ld_rlx(m, eo + 16), kn, vn = 0;
        if (v == 0)
            continue;
        if (!block_in(m, ld_rlx(m, eo + 8), r.heap, end, &kn) || (!(v & 1) && !block_in(m, v, r.heap, end, &vn)))
            return corrupt("an entry's blocks");
        live++;
        bytes += block_size(kn) + (v & 1 ? 0 : block_size(vn));
    }
    return Py_BuildValue("(KKKKK)", (unsigned long long)fs, (unsigned long long)r.off,
                         (unsigned long long)r.size, (unsigned long long)live, (unsigned long long)bytes);
}
OP_WRAPPER(dict_stats, 1)

/* dict_set_file_size(m, n): publish a larger file size (after ftruncate
 * and fallocate).  Lock held.  Never shrinks. */
static PyObject *
dict_set_file_size_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_set_file_size", nargs, 2, 2) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    unsigned long long n = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (!held_by_me(m) || n > (uint64_t)m->len)
        return PyErr_Format(PyExc_ValueError, "bad file size %llu", n);
    if (n > ld_rlx(m, H_FILE_SIZE))
        st_rel(m, H_FILE_SIZE, n);
    Py_RETURN_NONE;
}
OP_WRAPPER(dict_set_file_size, 1)

/* dict_rebuild(m, off, lgcap, size, empty=False) -> (old_off, old_size) or None.
 * Copies the live entries (none when `empty`: that is clear()), in order,
 * into a new region at [off, off+size)
 * (inside the file, disjoint from the current region) and publishes it.
 * None: they do not fit (nothing was published).  Lock held. */
static PyObject *
dict_rebuild_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_rebuild", nargs, 4, 5) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    unsigned long long off = PyLong_AsUnsignedLongLong(args[1]);
    long lg = PyLong_AsLong(args[2]);
    unsigned long long size = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (!held_by_me(m)) {
        PyErr_SetString(PyExc_RuntimeError, "dict_rebuild needs the lock");
        return NULL;
    }
    uint64_t fs = file_size(m);
    Region cur, nr;
    if (region_load(m, fs, &cur) < 0)
        return corrupt("current region");
    if (lg < 2 || lg > 40 || off % 64 || off < HEADER_SIZE)
        return PyErr_Format(PyExc_ValueError, "bad region parameters");
    region_geometry(&nr, off, (unsigned)lg, size);
    if (!inb(off, size, fs) || nr.heap > off + size ||
        !(off + size <= cur.off || off >= cur.off + cur.size))
        return PyErr_Format(PyExc_ValueError, "new region [%llu, +%llu) must lie in the file and not overlap the current one",
                            off, size);
    int empty = nargs > 4 && PyObject_IsTrue(args[4]);
    uint64_t nent = empty ? 0 : ld_rlx(m, cur.off + R_NENTRIES), cur_end = cur.off + cur.size;
    if (nent > cur.ecap)
        return corrupt("entry count");
    region_format(m, &nr);
    uint64_t top = nr.heap, end = off + size, ne = 0, mask = nr.cap - 1;
    for (uint64_t e = 0; e < nent; e++) {
        uint64_t eo = cur.ent + e * ENTRY, v = ld_rlx(m, eo + 16);
        if (v == 0)
            continue;
        /* Each word is read once and checked before it is used: a corrupt
         * entry stops the copy, and the new region, never published, is
         * garbage; the current one is as it was. */
        uint64_t h = ld_rlx(m, eo), kr = ld_rlx(m, eo + 8), kl, vl = 0;
        if (!block_in(m, kr, cur.heap, cur_end, &kl) || (!(v & 1) && !block_in(m, v, cur.heap, cur_end, &vl)))
            return corrupt("an entry's blocks");
        uint64_t need = block_size(kl) + ((v & 1) ? 0 : block_size(vl));
        if (ne >= nr.ecap || need > end - top)
            Py_RETURN_NONE;  /* too small: the current region is untouched */
        uint64_t nk = put_block(m, &top, m->addr + kr + 8, kl);
        uint64_t nv = (v & 1) ? v : put_block(m, &top, m->addr + v + 8, vl);
        uint64_t neo = nr.ent + ne * ENTRY;
        st_rlx(m, neo, h);
        st_rlx(m, neo + 8, nk);
        st_rlx(m, neo + 16, nv);
        uint64_t i = h & mask;
        while (ld_rlx(m, nr.idx + i * 8) != 0)
            i = (i + 1) & mask;
        st_rlx(m, nr.idx + i * 8, ne + 1);
        ne++;
    }
    st_rlx(m, off + R_NENTRIES, ne);
    st_rlx(m, off + R_COUNT, ne);
    st_rlx(m, off + R_HEAP_TOP, top);
    /* Publish: one store switches every reader to the new region; then
     * gen moves so readers still in the old one retry.  The full fence
     * orders the gen bump before anything later written into the old
     * region's space (by the next rebuild). */
    st_rel(m, H_DESC, off | (uint64_t)lg);
    __atomic_fetch_add(W(m, H_GEN), 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return Py_BuildValue("(KK)", (unsigned long long)cur.off, (unsigned long long)cur.size);
}
OP_WRAPPER(dict_rebuild, 1)


static PyObject *
dict_repair_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_repair", nargs, 1, 1) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    if (!held_by_me(m)) {
        PyErr_SetString(PyExc_RuntimeError, "dict_repair needs the lock");
        return NULL;
    }
    return dict_repair_impl(m);
}
OP_WRAPPER(dict_repair, 1)
