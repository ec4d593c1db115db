/* dict_layout.c: the SharedDict's memory as this process maps it: the Mapping
 * object, the region geometry and the probe, value encoding (layout: dict.h). */
#include "dict.h"

/* Incremented in the child after fork(): a lock "held by this thread" in
 * the parent is not held by the child's copy of that thread. */
unsigned long fork_generation;
void after_fork_child(void)
{
    fork_generation++;
    tracking_after_fork();
}

static PyObject *pickle_loads;  /* cached pickle.loads */
static Py_ssize_t mapping_count; /* Mappings mapped in this process */
static size_t mapping_bytes;     /* and the address space they reserve */

/* This thread's kernel id (cached; recomputed in a child after fork).
 * Not pthread_self(): a thread that ends while holding the lock (misuse,
 * the kernel then marks the mutex owner-died) leaves its pthread_t in
 * `owner`, and glibc hands the same pthread_t to the next thread it
 * starts, which would then believe it holds the lock.  Kernel ids are
 * not reused until pid_max ids later. */
static __thread pid_t tid_cache;
static __thread unsigned long tid_cache_fork;

pid_t
my_tid(void)
{
    if (tid_cache == 0 || tid_cache_fork != fork_generation) {
        tid_cache = (pid_t)syscall(SYS_gettid);
        tid_cache_fork = fork_generation;
    }
    return tid_cache;
}

int
held_by_me(MappingObject *m)
{
    return m->depth > 0 && m->owner_fork == fork_generation && m->owner == my_tid();
}

/* Some thread of this process holds the lock through this mapping. */
int
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
void
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

MappingObject *
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


/* Every dict_* operation on a mapping runs inside op_begin/op_end, so that
 * close() (from another thread, or from Python code the operation itself
 * runs: a finalizer, an unpickler) never unmaps memory it is reading. */
MappingObject *
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

void
op_end(MappingObject *m)
{
    if (m->busy_fork == fork_generation && m->busy > 0)  /* else it began before a fork */
        m->busy--;
    Mapping_maybe_unmap(m);
}


/* The memory does not hold what shoal writes: another process overwrote it
 * (or wrote it with another version), or a bug in shoal left it so. */
PyObject *
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


/* The file size published in the header, but never beyond the end of the
 * file (nor of the mapping): a size larger than this process last saw is
 * checked against the file (a writer grows the file before it publishes the
 * size, so a real growth is always confirmed). */
uint64_t
file_size_slow(MappingObject *m, uint64_t fs)
{
    struct stat st;
    if (m->fd >= 0 && fstat(m->fd, &st) == 0 && st.st_dev == m->dev && st.st_ino == m->ino &&
        (uint64_t)st.st_size > m->file_len)
        m->file_len = (uint64_t)st.st_size < (uint64_t)m->len ? (uint64_t)st.st_size : (uint64_t)m->len;
    return fs > m->file_len ? m->file_len : fs;
}



void
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
int
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
int
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
PyObject *
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



void copy_free(Copy *c) { if (c->p != c->small) PyMem_Free(c->p); c->p = NULL; }
