/* dict.c: the SharedDict core (see src/shoal/_shm/_dict.py for the Python side). */
#include "shoal_native.h"

/* ------------------------------------------------------------------------
 * 5. SharedDict core
 *
 * One memfd, mapped by every process at the same length (the dict's
 * max_size; pages beyond the file's size are never touched).  All offsets
 * are from the start of the file, so they mean the same in every process.
 *
 *   header (256 B)      magic, file_size, desc, gen, max_size, robust mutex
 *   region (current)    region header: size, log2(cap), nentries, count, heap_top
 *                       index:   cap x u64    (entry number + 1, 0 = empty)
 *                       entries: cap/2 x {hash, key_ref, value}
 *                       heap:    blocks {u64 len, bytes, pad to 8}, append-only
 *   other bytes         the previous region (garbage, holes punched) and
 *                       the space the next region will use
 *
 * Misuse raises instead of faulting: Mapping() refuses a file smaller than
 * the header, every operation but dict_init checks the magic number, and
 * dict_init refuses a file size beyond what the file had when mapped.
 *
 * Corrupt memory raises too (CorruptDataError: see corrupt_error_type): every word read from the file is checked before
 * it is used as an offset or a length -- region geometry inside the file,
 * entry numbers below the entry capacity, blocks 8-aligned, inside the
 * region's heap, their lengths inside it -- so another process writing
 * anything anywhere in the file can make an operation fail, never read or
 * write outside the file or at a misaligned address.  The published file
 * size is trusted only as far as the file really goes: a size beyond what
 * this process last saw is checked with one fstat (once per growth, not per
 * operation), and anything beyond the file is treated as corrupt, never
 * touched (that would be SIGBUS).
 *
 * value word: 0 = no value (deleted), odd = an inline int (word >> 1),
 * even = offset of a block holding a tag byte and the encoded value.
 * Entries are in insertion order; a key is written once per entry.
 *
 * Publication: every mutation writes into space no reader can reach yet
 * and then makes it visible with one atomic release store (an index slot,
 * a value word, or `desc` for a whole new region).  Heap blocks are never
 * rewritten while their region is current.  So a lock-free reader needs
 * only to notice one thing: that the region it read from was replaced and
 * maybe reused.  It reads `gen` before and after (a seqlock on the layout)
 * and retries when it moved.  A writer killed at any point leaves the last
 * published state plus garbage; the next locker (EOWNERDEAD) recomputes
 * nentries and count from the published words, raises heap_top to cover
 * every block referenced (never lowers it: a reader may still be copying a
 * block whose value was replaced) and moves gen (dict_repair).
 * ---------------------------------------------------------------------- */

#define H_MAGIC 0
#define H_FILE_SIZE 8
#define H_DESC 16
#define H_GEN 24
#define H_MAX_SIZE 32
#define H_MUTEX 64

#define R_SIZE 0
#define R_LGCAP 8
#define R_NENTRIES 16
#define R_COUNT 24
#define R_HEAP_TOP 32

#define READ_RETRIES 200

_Static_assert(sizeof(pthread_mutex_t) <= HEADER_SIZE - H_MUTEX, "mutex does not fit the header");

/* Incremented in the child after fork(): a lock "held by this thread" in
 * the parent is not held by the child's copy of that thread. */
static unsigned long fork_generation;
void after_fork_child(void) { fork_generation++; }

typedef struct {
    PyObject_HEAD
    char *addr;
    Py_ssize_t len;
    uint64_t file_len;           /* the file's size as this process last saw it (at most len) */
    /* The descriptor it maps (borrowed: the caller closes it after close()),
     * to see how far the file really goes when another process says it
     * grew; -1 once closed.  Used only while it still names the same file. */
    int fd;
    dev_t dev;
    ino_t ino;
    /* Native operations in progress on this mapping in this process
     * (any of them may run Python code or drop the GIL midway, and another
     * thread or a finalizer may close the dict then).  Counted per fork
     * generation: the threads counted in the parent do not exist in a
     * child. */
    Py_ssize_t busy;
    unsigned long busy_fork;
    int closed;
    /* Ownership of the dict lock by a thread of this process, for
     * re-entrancy (with d.locked(): d[k] += 1). */
    int depth;
    pid_t owner;                 /* kernel thread id of the holder */
    unsigned long owner_fork;
    /* The holding thread took the lock through another Mapping of the same
     * dict in this process (two handles: one from a pool initializer, one
     * from a task's arguments); releasing this one must not unlock. */
    int borrowed;
} MappingObject;


static PyObject *pickle_loads;  /* cached pickle.loads */
static Py_ssize_t mapping_count; /* Mappings mapped in this process */
static size_t mapping_bytes;     /* and the address space they reserve */

static inline uint64_t *W(MappingObject *m, uint64_t off) { return (uint64_t *)(m->addr + off); }
static inline uint64_t ld_acq(MappingObject *m, uint64_t off) { return __atomic_load_n(W(m, off), __ATOMIC_ACQUIRE); }
static inline uint64_t ld_rlx(MappingObject *m, uint64_t off) { return __atomic_load_n(W(m, off), __ATOMIC_RELAXED); }
static inline void st_rel(MappingObject *m, uint64_t off, uint64_t v) { __atomic_store_n(W(m, off), v, __ATOMIC_RELEASE); }
static inline void st_rlx(MappingObject *m, uint64_t off, uint64_t v) { __atomic_store_n(W(m, off), v, __ATOMIC_RELAXED); }
static inline uint64_t pad8(uint64_t n) { return (n + 7) & ~7ULL; }
/* [off, off+len) lies within the first `limit` bytes. */
static inline int inb(uint64_t off, uint64_t len, uint64_t limit) { return off <= limit && len <= limit - off; }

/* This thread's kernel id (cached; recomputed in a child after fork).
 * Not pthread_self(): a thread that ends while holding the lock (misuse,
 * the kernel then marks the mutex owner-died) leaves its pthread_t in
 * `owner`, and glibc hands the same pthread_t to the next thread it
 * starts, which would then believe it holds the lock.  Kernel ids are
 * not reused until pid_max ids later. */
static __thread pid_t tid_cache;
static __thread unsigned long tid_cache_fork;

static pid_t
my_tid(void)
{
    if (tid_cache == 0 || tid_cache_fork != fork_generation) {
        tid_cache = (pid_t)syscall(SYS_gettid);
        tid_cache_fork = fork_generation;
    }
    return tid_cache;
}

static int
held_by_me(MappingObject *m)
{
    return m->depth > 0 && m->owner_fork == fork_generation && m->owner == my_tid();
}

/* Some thread of this process holds the lock through this mapping. */
static int
held_here(MappingObject *m)
{
    return m->depth > 0 && m->owner_fork == fork_generation;
}

/* --- the Mapping object: an mmap of length max_size over the memfd ------ */

static PyObject *
Mapping_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int fd;
    Py_ssize_t length;
    static char *kwlist[] = {"fd", "length", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "in:Mapping", kwlist, &fd, &length))
        return NULL;
    if (length < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "mapping length too small");
        return NULL;
    }
    /* Touching a page beyond the end of the file is SIGBUS, not an error:
     * the header at least must exist. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (st.st_size < HEADER_SIZE)
        return PyErr_Format(PyExc_ValueError, "descriptor %d does not hold a SharedDict (a file of %lld bytes)", fd,
                            (long long)st.st_size);
    /* MAP_NORESERVE: this reserves address space only; pages exist only
     * where the file has them, and the code never touches beyond the
     * published file size (that would be SIGBUS). */
    void *addr = mmap(NULL, (size_t)length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (addr == MAP_FAILED && errno == ENOMEM)
        return PyErr_Format(PyExc_MemoryError,
                            "cannot reserve %zd bytes of address space for a SharedDict: every handle "
                            "reserves its dict's max_size, and this process holds %zd others reserving "
                            "%zd MiB (or has hit the kernel's limit on mappings, vm.max_map_count); "
                            "close the SharedDicts you no longer use, or create them with a smaller max_size",
                            length, mapping_count, (Py_ssize_t)(mapping_bytes >> 20));
    if (addr == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    MappingObject *m = (MappingObject *)type->tp_alloc(type, 0);
    if (m == NULL) {
        munmap(addr, (size_t)length);
        return NULL;
    }
    m->addr = addr;
    m->len = length;
    m->file_len = (uint64_t)st.st_size < (uint64_t)length ? (uint64_t)st.st_size : (uint64_t)length;
    m->fd = fd;
    m->dev = st.st_dev;
    m->ino = st.st_ino;
    mapping_count++;
    mapping_bytes += (size_t)length;
    return (PyObject *)m;
}

static void
Mapping_unmap(MappingObject *m)
{
    if (m->addr != NULL) {
        munmap(m->addr, (size_t)m->len);
        m->addr = NULL;
        mapping_count--;
        mapping_bytes -= (size_t)m->len;
    }
}

/* Unmap a closed mapping once nothing of this process uses it: no native
 * operation in progress (they read through addr after calls that can run
 * Python code: allocations, unpickling, waiting for the lock) and the lock
 * not held by a thread of this process.  A held robust mutex must stay
 * mapped: glibc links the mutexes a thread holds into a list through the
 * mutexes themselves, and the next lock or unlock by that thread (or the
 * kernel at its exit) walks that list. */
static void
Mapping_maybe_unmap(MappingObject *m)
{
    if (m->busy_fork != fork_generation) {
        m->busy = 0;
        m->busy_fork = fork_generation;
    }
    if (m->closed && m->busy == 0 && !held_here(m))
        Mapping_unmap(m);
}

static void
Mapping_dealloc(MappingObject *m)
{
    /* Freed while one of our threads holds the lock (its release was
     * never called): leak the address space rather than unmap a mutex
     * on that thread's robust list. */
    if (!held_here(m))
        Mapping_unmap(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

/* close(): mark closed (every later operation raises ValueError) and unmap
 * now, or when the last operation in progress ends, or when the thread
 * holding the lock releases it (dict_unlock). */
static PyObject *
Mapping_close(MappingObject *m, PyObject *unused)
{
    m->closed = 1;
    m->fd = -1;  /* the caller closes it next */
    Mapping_maybe_unmap(m);
    Py_RETURN_NONE;
}

static PyObject *
Mapping_get_closed(MappingObject *m, void *unused)
{
    return PyBool_FromLong(m->closed);
}

static PyObject *
Mapping_get_length(MappingObject *m, void *unused)
{
    return PyLong_FromSsize_t(m->len);
}

static PyMethodDef Mapping_methods[] = {
    {"close", (PyCFunction)Mapping_close, METH_NOARGS, "Unmap (idempotent)."},
    {NULL},
};

static PyGetSetDef Mapping_getset[] = {
    {"closed", (getter)Mapping_get_closed, NULL, NULL, NULL},
    {"length", (getter)Mapping_get_length, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject Mapping_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shoal._native.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_dealloc = (destructor)Mapping_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mapping(fd, length): a shared mapping of a SharedDict's memfd (fd stays the caller's: "
              "close it after close()).",
    .tp_methods = Mapping_methods,
    .tp_getset = Mapping_getset,
    .tp_new = Mapping_new,
};

static MappingObject *
as_mapping(PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, &Mapping_Type)) {
        PyErr_SetString(PyExc_TypeError, "expected a shoal._native.Mapping");
        return NULL;
    }
    MappingObject *m = (MappingObject *)obj;
    if (m->closed || m->addr == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a closed SharedDict");
        return NULL;
    }
    return m;
}

static PyObject *corrupt(const char *what);

/* Every dict_* operation on a mapping runs inside op_begin/op_end, so that
 * close() (from another thread, or from Python code the operation itself
 * runs: a finalizer, an unpickler) never unmaps memory it is reading. */
static MappingObject *
op_begin(PyObject *obj, int need_magic)
{
    MappingObject *m = as_mapping(obj);
    if (m == NULL)
        return NULL;
    if (need_magic && ld_acq(m, H_MAGIC) != DICT_MAGIC) {
        corrupt("no magic number: the memory does not hold a SharedDict");
        return NULL;
    }
    if (m->busy_fork != fork_generation) {
        m->busy = 0;
        m->busy_fork = fork_generation;
    }
    m->busy++;
    return m;
}

static void
op_end(MappingObject *m)
{
    if (m->busy_fork == fork_generation && m->busy > 0)  /* else it began before a fork */
        m->busy--;
    Mapping_maybe_unmap(m);
}

#define OP_WRAPPER(name, need_magic)                                              \
    PyObject *name(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) \
    {                                                                             \
        if (nargs < 1)                                                            \
            return name##_body(mod, args, nargs);                                 \
        MappingObject *m = op_begin(args[0], need_magic);                         \
        if (m == NULL)                                                            \
            return NULL;                                                          \
        PyObject *res = name##_body(mod, args, nargs);                            \
        op_end(m);                                                                \
        return res;                                                               \
    }

/* The memory does not hold what shoal writes: another process overwrote it
 * (or wrote it with another version), or a bug in shoal left it so. */
static PyObject *
corrupt(const char *what)
{
    PyErr_Format(corrupt_error_type(),
                 "SharedDict memory is inconsistent (%s): the process that wrote it is not shoal of this "
                 "version, or the bytes were overwritten (by a C extension, or a stray write to a descriptor "
                 "or shared memory it holds), or this is a bug in shoal",
                 what);
    return NULL;
}


/* --- regions ----------------------------------------------------------- */

typedef struct {
    uint64_t off, size, cap, ecap, idx, ent, heap;
} Region;

/* The file size published in the header, but never beyond the end of the
 * file (nor of the mapping): a size larger than this process last saw is
 * checked against the file (a writer grows the file before it publishes the
 * size, so a real growth is always confirmed). */
static uint64_t
file_size_slow(MappingObject *m, uint64_t fs)
{
    struct stat st;
    if (m->fd >= 0 && fstat(m->fd, &st) == 0 && st.st_dev == m->dev && st.st_ino == m->ino &&
        (uint64_t)st.st_size > m->file_len)
        m->file_len = (uint64_t)st.st_size < (uint64_t)m->len ? (uint64_t)st.st_size : (uint64_t)m->len;
    return fs > m->file_len ? m->file_len : fs;
}

static inline uint64_t file_size(MappingObject *m)
{
    uint64_t fs = ld_acq(m, H_FILE_SIZE);
    return fs > m->file_len ? file_size_slow(m, fs) : fs;
}

/* A block at `ref` (8-aligned, inside [lo, hi)) and its length inside it:
 * 1 with *n set, else 0. */
static inline int
block_in(MappingObject *m, uint64_t ref, uint64_t lo, uint64_t hi, uint64_t *n)
{
    if ((ref & 7) || ref < lo || !inb(ref, 8, hi))
        return 0;
    *n = ld_rlx(m, ref);
    return inb(ref + 8, *n, hi);
}

static void
region_geometry(Region *r, uint64_t off, unsigned lg, uint64_t size)
{
    r->off = off;
    r->size = size;
    r->cap = 1ULL << lg;
    r->ecap = r->cap / 2;
    r->idx = off + REGION_HEADER;
    r->ent = r->idx + r->cap * 8;
    r->heap = r->ent + r->ecap * ENTRY;
}

/* Read the current region's geometry.  -1: the words read make no sense
 * (only possible for a lock-free reader racing a region switch). */
static int
region_load(MappingObject *m, uint64_t fs, Region *r)
{
    uint64_t desc = ld_acq(m, H_DESC);
    uint64_t off = desc & ~63ULL;
    unsigned lg = (unsigned)(desc & 63);
    if (lg < 2 || lg > 40 || off < HEADER_SIZE || !inb(off, REGION_HEADER, fs))
        return -1;
    region_geometry(r, off, lg, ld_rlx(m, off + R_SIZE));
    if (!inb(off, r->size, fs) || r->heap > off + r->size)
        return -1;
    return 0;
}

/* Probe the index for `key`.  Returns 1 (found: *pos = index slot, *ent =
 * entry number), 0 (absent: *pos = the empty slot where it would go), or
 * -1 (inconsistent words, or no empty slot).  Entries found may be dead
 * (value 0); the key stays so that a re-insert finds its slot. */
static int
probe(MappingObject *m, const Region *r, uint64_t fs, uint64_t h, const char *key, uint64_t klen,
      uint64_t *pos, uint64_t *ent)
{
    uint64_t mask = r->cap - 1, i = h & mask;
    for (uint64_t n = 0; n < r->cap; n++, i = (i + 1) & mask) {
        uint64_t e = ld_acq(m, r->idx + i * 8);
        if (e == 0) {
            *pos = i;
            return 0;
        }
        e -= 1;
        if (e >= r->ecap)
            return -1;
        uint64_t eo = r->ent + e * ENTRY;
        if (ld_rlx(m, eo) != h)
            continue;
        uint64_t kr = ld_rlx(m, eo + 8);
        if ((kr & 7) || !inb(kr, 8, fs))
            return -1;
        uint64_t kl = ld_rlx(m, kr);
        if (kl != klen)
            continue;
        if (!inb(kr + 8, kl, fs))
            return -1;
        if (memcmp(m->addr + kr + 8, key, (size_t)klen) == 0) {
            *pos = i;
            *ent = e;
            return 1;
        }
    }
    return -1;
}

/* --- values -------------------------------------------------------------- */

/* Encoded values: inline ints in the word; otherwise a block whose first
 * byte is a tag: 's' str (UTF-8, surrogatepass), 'b' bytes, 'f' float
 * (8 bytes LE), 'n' None, 'T' True, 'F' False, 'p' pickle. */
static PyObject *
decode_value(const char *p, uint64_t n)
{
    if (n == 0)
        return corrupt("empty value");
    const char *d = p + 1;
    Py_ssize_t dn = (Py_ssize_t)(n - 1);
    switch (p[0]) {
    case 's': {
        PyObject *text = PyUnicode_DecodeUTF8(d, dn, "surrogatepass");
        if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();  /* shoal writes every str it stores as UTF-8 */
            return corrupt("a str value that is not UTF-8");
        }
        return text;
    }
    case 'b':
        return PyBytes_FromStringAndSize(d, dn);
    case 'f': {
        double x;
        if (dn != 8)
            return corrupt("float size");
        memcpy(&x, d, 8);
        return PyFloat_FromDouble(x);
    }
    case 'n':
        Py_RETURN_NONE;
    case 'T':
        Py_RETURN_TRUE;
    case 'F':
        Py_RETURN_FALSE;
    case 'p': {
        if (pickle_loads == NULL) {
            PyObject *pickle = PyImport_ImportModule("pickle");
            if (pickle == NULL)
                return NULL;
            pickle_loads = PyObject_GetAttrString(pickle, "loads");
            Py_DECREF(pickle);
            if (pickle_loads == NULL)
                return NULL;
        }
        /* A private copy: unpickling runs arbitrary code, which must never
         * see shared memory that can change under it. */
        PyObject *data = PyBytes_FromStringAndSize(d, dn);
        if (data == NULL)
            return NULL;
        PyObject *res = PyObject_CallOneArg(pickle_loads, data);
        Py_DECREF(data);
        return res;
    }
    default:
        return corrupt("unknown value tag");
    }
}

static inline PyObject *
inline_int(uint64_t w)
{
    return PyLong_FromLongLong((int64_t)w >> 1);
}

/* A value copied out of shared memory: small ones on the stack. */
typedef struct {
    char small[256];
    char *p;
    uint64_t n;
} Copy;

static void copy_free(Copy *c) { if (c->p != c->small) PyMem_Free(c->p); c->p = NULL; }

/* --- the lock ------------------------------------------------------------ */

static PyObject *dict_repair_impl(MappingObject *m);

static void
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
static int
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

static void
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
static PyObject *
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

/* A value to store: an inline word, or a tagged encoding to copy. */
typedef struct {
    uint64_t word;      /* nonzero when inline */
    const char *data;
    uint64_t len;
} NewValue;

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
