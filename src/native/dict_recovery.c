/* dict_recovery.c: the SharedDict's robust lock, and what makes a dict whole
 * again after a holder died: init, repair, check (layout: dict.h). */
#include "dict.h"

/* --- the lock ------------------------------------------------------------ */


void
dict_exit(MappingObject *m, int took)
{
    if (!took)
        return;
    m->depth = 0;
    pthread_mutex_unlock((pthread_mutex_t *)(m->addr + H_MUTEX));
}

/* Whether the mutex's type word (glibc's __kind: robust, process-shared,
 * error-checking) is what init_robust_mutex writes.  glibc trusts that word
 * and dispatches on it: another type (priority-protected, priority-
 * inheriting, not robust...) overwritten into shared memory would make
 * pthread_mutex_lock abort on an assertion, or follow the robust-list
 * pointers stored beside it (wild writes: SIGSEGV).  Read once, before
 * every lock. */
static int
mutex_kind_ok(pthread_mutex_t *mu)
{
#if defined(__GLIBC__)
    static int expected = -1;
    if (expected == -1) {
        pthread_mutex_t model;
        if (init_robust_mutex(&model) < 0) {
            PyErr_Clear();
            return 1;  /* cannot tell: let the lock report it */
        }
        expected = model.__data.__kind;
        pthread_mutex_destroy(&model);
    }
    return __atomic_load_n(&mu->__data.__kind, __ATOMIC_RELAXED) == expected;
#else
    (void)mu;
    return 1;
#endif
}

/* Take the dict lock unless this thread holds it (through this handle, or
 * through another handle of the same dict: the mutex reports EDEADLK).
 * *took tells the caller whether to release it.  A dead holder's leftovers
 * are repaired here. */
int
dict_enter(MappingObject *m, double timeout, int *took, int *owner_died)
{
    *took = 0;
    if (owner_died)
        *owner_died = 0;
    if (held_by_me(m))
        return 0;
    pthread_mutex_t *mu = (pthread_mutex_t *)(m->addr + H_MUTEX);
    if (!mutex_kind_ok(mu)) {
        corrupt("the lock's type word is not a robust process-shared mutex's");
        return -1;
    }
    /* No spinning with the GIL held when the holder is another thread of
     * this process: it needs the GIL to finish. */
    int spin = !held_here(m);
    int r = lock_robust(mu, timeout, spin);
    if (r < 0)
        return -1;
    if (r == EDEADLK)  /* held by this thread through another handle */
        return 0;
    if (r == ETIMEDOUT) {
        PyErr_SetString(PyExc_TimeoutError, "timed out waiting for the SharedDict lock");
        return -1;
    }
    m->depth = 1;
    m->owner = my_tid();
    m->owner_fork = fork_generation;
    m->borrowed = 0;
    *took = 1;
    if (r == EOWNERDEAD) {
        PyObject *res = dict_repair_impl(m);
        if (res == NULL) {
            /* Leave it locked and inconsistent: releasing would make it
             * unrecoverable for everyone.  This cannot happen unless the
             * memory is corrupt. */
            return -1;
        }
        Py_DECREF(res);
        pthread_mutex_consistent(mu);
        if (owner_died)
            *owner_died = 1;
    }
    if (m->closed) {  /* closed by another thread while we waited */
        dict_exit(m, 1);
        *took = 0;
        PyErr_SetString(PyExc_ValueError, "operation on a closed SharedDict");
        return -1;
    }
    return 0;
}

/* dict_lock(m, timeout=None) -> owner_died.  Re-entrant per thread. */
static PyObject *
dict_lock_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    double timeout;
    int took, died;
    if (check_nargs("dict_lock", nargs, 1, 2) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL || parse_timeout(nargs > 1 ? args[1] : NULL, &timeout) < 0)
        return NULL;
    if (held_by_me(m)) {
        m->depth++;
        Py_RETURN_FALSE;
    }
    if (dict_enter(m, timeout, &took, &died) < 0)
        return NULL;
    if (!took) {  /* this thread holds it through another handle */
        m->depth = 1;
        m->owner = my_tid();
        m->owner_fork = fork_generation;
        m->borrowed = 1;
    }
    return PyBool_FromLong(died);
}
OP_WRAPPER(dict_lock, 1)

PyObject *
dict_unlock(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_unlock", nargs, 1, 1) < 0)
        return NULL;
    MappingObject *m = (MappingObject *)args[0];
    if (!PyObject_TypeCheck(args[0], &Mapping_Type) || m->addr == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed SharedDict");
        return NULL;
    }
    if (!held_by_me(m)) {
        PyErr_SetString(PyExc_RuntimeError, "release of a SharedDict lock this thread does not hold");
        return NULL;
    }
    if (--m->depth == 0) {
        if (!m->borrowed)
            pthread_mutex_unlock((pthread_mutex_t *)(m->addr + H_MUTEX));
        m->borrowed = 0;
        Mapping_maybe_unmap(m);  /* closed while locked: unmapped now */
    }
    Py_RETURN_NONE;
}

static PyObject *
dict_held_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_held", nargs, 1, 1) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    return PyBool_FromLong(held_by_me(m));
}
OP_WRAPPER(dict_held, 1)

/* DictLock(mapping, timeout, result): what SharedDict.locked() returns.
 * It is in C so that __enter__ *is* the acquisition: Python runs a pending
 * signal handler (KeyboardInterrupt) only between bytecodes, so a signal
 * that arrives while waiting and is handled after the lock is taken lands
 * inside the with block, whose __exit__ then releases it.  A Python-level
 * __enter__ (or @contextmanager) would raise it before the block started,
 * and the lock would never be released. */
typedef struct {
    PyObject_HEAD
    PyObject *mapping, *timeout, *result;
} DictLockObject;

static PyObject *
DictLock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *mapping, *timeout = Py_None, *result = Py_None;
    static char *kwlist[] = {"mapping", "timeout", "result", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO:DictLock", kwlist, &mapping, &timeout, &result))
        return NULL;
    if (!PyObject_TypeCheck(mapping, &Mapping_Type)) {
        PyErr_SetString(PyExc_TypeError, "expected a shoal._native.Mapping");
        return NULL;
    }
    double t;
    if (parse_timeout(timeout, &t) < 0)
        return NULL;
    DictLockObject *self = (DictLockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(mapping);
    Py_INCREF(timeout);
    Py_INCREF(result);
    self->mapping = mapping;
    self->timeout = timeout;
    self->result = result;
    return (PyObject *)self;
}

static int
DictLock_traverse(DictLockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->mapping);
    Py_VISIT(self->timeout);
    Py_VISIT(self->result);
    return 0;
}

static int
DictLock_clear(DictLockObject *self)
{
    Py_CLEAR(self->mapping);
    Py_CLEAR(self->timeout);
    Py_CLEAR(self->result);
    return 0;
}

static void
DictLock_dealloc(DictLockObject *self)
{
    PyObject_GC_UnTrack(self);
    DictLock_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}


static PyObject *
DictLock_enter(DictLockObject *self, PyObject *unused)
{
    if (self->mapping == NULL) {
        PyErr_SetString(PyExc_ValueError, "DictLock was cleared");
        return NULL;
    }
    PyObject *args[2] = {self->mapping, self->timeout};
    PyObject *died = dict_lock(NULL, args, 2);
    if (died == NULL)
        return NULL;
    Py_DECREF(died);
    Py_INCREF(self->result);
    return self->result;
}

static PyObject *
DictLock_exit(DictLockObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->mapping == NULL) {
        PyErr_SetString(PyExc_ValueError, "DictLock was cleared");
        return NULL;
    }
    PyObject *res = dict_unlock(NULL, &self->mapping, 1);
    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    Py_RETURN_FALSE;
}

static PyMethodDef DictLock_methods[] = {
    {"__enter__", (PyCFunction)DictLock_enter, METH_NOARGS, "Take the lock (re-entrant); return the dict."},
    {"__exit__", (PyCFunction)(void (*)(void))DictLock_exit, METH_FASTCALL, "Release the lock."},
    {NULL},
};

PyTypeObject DictLock_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shoal._native.DictLock",
    .tp_basicsize = sizeof(DictLockObject),
    .tp_dealloc = (destructor)DictLock_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "DictLock(mapping, timeout=None, result=None): a context manager holding a SharedDict's lock.",
    .tp_traverse = (traverseproc)DictLock_traverse,
    .tp_clear = (inquiry)DictLock_clear,
    .tp_methods = DictLock_methods,
    .tp_new = DictLock_new,
};

/* --- init, repair, check --------------------------------------------------- */

void
region_format(MappingObject *m, const Region *r)
{
    memset(m->addr + r->off, 0, (size_t)(r->heap - r->off));
    st_rlx(m, r->off + R_SIZE, r->size);
    st_rlx(m, r->off + R_LGCAP, (uint64_t)__builtin_ctzll(r->cap));
    st_rlx(m, r->off + R_HEAP_TOP, r->heap);
}

/* dict_init(m, file_size): format a new, empty dict (the file had at least
 * file_size bytes when it was mapped; the mapping's length is its
 * max_size). */
static PyObject *
dict_init_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("dict_init", nargs, 2, 2) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL)
        return NULL;
    unsigned long long fs = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    Region r;
    region_geometry(&r, HEADER_SIZE, 3, fs - HEADER_SIZE);
    if (fs > (uint64_t)m->len || fs > m->file_len || fs < HEADER_SIZE || r.heap > fs)
        return PyErr_Format(PyExc_ValueError, "file size %llu too small, or beyond the mapping or the file", fs);
    memset(m->addr, 0, HEADER_SIZE);
    if (init_robust_mutex((pthread_mutex_t *)(m->addr + H_MUTEX)) < 0)
        return NULL;
    region_format(m, &r);
    st_rlx(m, H_FILE_SIZE, fs);
    st_rlx(m, H_MAX_SIZE, (uint64_t)m->len);
    st_rlx(m, H_DESC, r.off | 3);
    st_rel(m, H_MAGIC, DICT_MAGIC);
    Py_RETURN_NONE;
}
OP_WRAPPER(dict_init, 0)

/* After a holder died: recompute the derived words of the current region
 * from what was published (see the section comment).  Lock held. */
PyObject *
dict_repair_impl(MappingObject *m)
{
    uint64_t fs = file_size(m);
    Region r;
    if (region_load(m, fs, &r) < 0)
        return corrupt("current region");
    uint64_t nent = ld_rlx(m, r.off + R_NENTRIES);
    if (nent > r.ecap)
        nent = r.ecap;
    /* An entry is published in the index before nentries counts it. */
    for (uint64_t i = 0; i < r.cap; i++) {
        uint64_t e = ld_rlx(m, r.idx + i * 8);
        if (e > nent && e <= r.ecap)
            nent = e;
    }
    uint64_t count = 0, top = r.heap, end = r.off + r.size;
    for (uint64_t e = 0; e < nent; e++) {
        uint64_t eo = r.ent + e * ENTRY;
        uint64_t refs[2] = {ld_rlx(m, eo + 8), ld_rlx(m, eo + 16)};
        if (refs[1] != 0)
            count++;
        for (int k = 0; k < 2; k++) {
            uint64_t ref = refs[k];
            uint64_t n;
            if (ref == 0 || !block_in(m, ref, r.heap, end, &n))
                continue;  /* an inline int, or garbage: not a block to keep */
            uint64_t bend = ref + 8 + pad8(n);
            if (bend > top && bend <= end)
                top = bend;
        }
    }
    /* Never lower the heap top: the blocks above the highest one still
     * referenced were referenced a moment ago (a value since replaced), and
     * a lock-free reader may be copying one now; handing that space to the
     * next write would change bytes under it without moving gen. */
    uint64_t old_top = ld_rlx(m, r.off + R_HEAP_TOP);
    if (old_top > top && old_top <= end)
        top = old_top;
    st_rel(m, r.off + R_NENTRIES, nent);
    st_rel(m, r.off + R_COUNT, count);
    st_rlx(m, r.off + R_HEAP_TOP, top);
    /* And move gen, so that a reader that started before the holder died
     * retries: the holder may have died between publishing a new region
     * (desc) and moving gen itself (dict_rebuild). */
    __atomic_fetch_add(W(m, H_GEN), 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* dict_check(m) -> count.  Verifies every invariant under the lock and
 * raises RuntimeError naming the first violation (used by tests). */
static PyObject *
dict_check_body(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    int took;
    if (check_nargs("dict_check", nargs, 1, 1) < 0)
        return NULL;
    MappingObject *m = as_mapping(args[0]);
    if (m == NULL || dict_enter(m, -1, &took, NULL) < 0)
        return NULL;
    PyObject *res = NULL;
    uint64_t fs = file_size(m);
    Region r;
    if (ld_rlx(m, H_MAGIC) != DICT_MAGIC) {
        corrupt("magic");
        goto done;
    }
    if (region_load(m, fs, &r) < 0) {
        corrupt("region descriptor");
        goto done;
    }
    uint64_t nent = ld_rlx(m, r.off + R_NENTRIES), top = ld_rlx(m, r.off + R_HEAP_TOP);
    uint64_t end = r.off + r.size, live = 0;
    if (nent > r.ecap || top < r.heap || top > end) {
        corrupt("region counters");
        goto done;
    }
    for (uint64_t i = 0; i < r.cap; i++) {
        uint64_t e = ld_rlx(m, r.idx + i * 8);
        if (e > nent) {
            corrupt("index slot beyond nentries");
            goto done;
        }
    }
    for (uint64_t e = 0; e < nent; e++) {
        uint64_t eo = r.ent + e * ENTRY;
        uint64_t h = ld_rlx(m, eo), kr = ld_rlx(m, eo + 8), v = ld_rlx(m, eo + 16), klen, vlen;
        if (!block_in(m, kr, r.heap, top, &klen)) {
            corrupt("key block out of the heap");
            goto done;
        }
        if (xxh64(m->addr + kr + 8, (size_t)klen, 0) != h) {
            corrupt("stored hash differs from the key's");
            goto done;
        }
        if (v == 0)
            continue;
        live++;
        if (!(v & 1) && (!block_in(m, v, r.heap, top, &vlen) || vlen == 0)) {
            corrupt("value block out of the heap");
            goto done;
        }
        /* A live entry must be the one its key's probe reaches. */
        uint64_t pos, found;
        if (probe(m, &r, fs, h, m->addr + kr + 8, klen, &pos, &found) != 1 || found != e) {
            corrupt("live entry not reachable through the index");
            goto done;
        }
    }
    if (live != ld_rlx(m, r.off + R_COUNT)) {
        corrupt("count differs from the live entries");
        goto done;
    }
    res = PyLong_FromUnsignedLongLong(live);
done:
    dict_exit(m, took);
    return res;
}
OP_WRAPPER(dict_check, 1)
