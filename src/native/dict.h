/* dict.h: the SharedDict core's private header, shared by
 *   dict_layout.c    the memory layout: the Mapping object, regions, values
 *   dict_recovery.c  the robust lock, and init / repair / check (a holder that died)
 *   dict_ops.c       the operations: lock-free reads, writes, growth
 * (see src/shoal/_shm/_dict.py for the Python side). */
#ifndef SHOAL_DICT_H
#define SHOAL_DICT_H

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

/* Incremented in the child after fork() (dict_layout.c): a lock "held by
 * this thread" in the parent is not held by the child's copy of that thread. */
extern unsigned long fork_generation;

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


static inline uint64_t *W(MappingObject *m, uint64_t off) { return (uint64_t *)(m->addr + off); }
static inline uint64_t ld_acq(MappingObject *m, uint64_t off) { return __atomic_load_n(W(m, off), __ATOMIC_ACQUIRE); }
static inline uint64_t ld_rlx(MappingObject *m, uint64_t off) { return __atomic_load_n(W(m, off), __ATOMIC_RELAXED); }
static inline void st_rel(MappingObject *m, uint64_t off, uint64_t v) { __atomic_store_n(W(m, off), v, __ATOMIC_RELEASE); }
static inline void st_rlx(MappingObject *m, uint64_t off, uint64_t v) { __atomic_store_n(W(m, off), v, __ATOMIC_RELAXED); }
static inline uint64_t pad8(uint64_t n) { return (n + 7) & ~7ULL; }
/* [off, off+len) lies within the first `limit` bytes. */
static inline int inb(uint64_t off, uint64_t len, uint64_t limit) { return off <= limit && len <= limit - off; }

typedef struct {
    uint64_t off, size, cap, ecap, idx, ent, heap;
} Region;

/* A value copied out of shared memory: small ones on the stack. */
typedef struct {
    char small[256];
    char *p;
    uint64_t n;
} Copy;

/* A value to store: an inline word, or a tagged encoding to copy. */
typedef struct {
    uint64_t word;      /* nonzero when inline */
    const char *data;
    uint64_t len;
} NewValue;

/* Defined in one file of the three, used in another. */
void Mapping_maybe_unmap(MappingObject *m);  /* dict_layout.c */
MappingObject *as_mapping(PyObject *obj);  /* dict_layout.c */
void copy_free(Copy *c);  /* dict_layout.c */
PyObject *corrupt(const char *what);  /* dict_layout.c */
PyObject *decode_value(const char *p, uint64_t n);  /* dict_layout.c */
uint64_t file_size_slow(MappingObject *m, uint64_t fs);  /* dict_layout.c */
int held_by_me(MappingObject *m);  /* dict_layout.c */
int held_here(MappingObject *m);  /* dict_layout.c */
pid_t my_tid(void);  /* dict_layout.c */
MappingObject *op_begin(PyObject *obj, int need_magic);  /* dict_layout.c */
void op_end(MappingObject *m);  /* dict_layout.c */
int probe(MappingObject *m, const Region *r, uint64_t fs, uint64_t h, const char *key, uint64_t klen,
      uint64_t *pos, uint64_t *ent);  /* dict_layout.c */
void region_geometry(Region *r, uint64_t off, unsigned lg, uint64_t size);  /* dict_layout.c */
int region_load(MappingObject *m, uint64_t fs, Region *r);  /* dict_layout.c */
int dict_enter(MappingObject *m, double timeout, int *took, int *owner_died);  /* dict_recovery.c */
void dict_exit(MappingObject *m, int took);  /* dict_recovery.c */
PyObject *dict_repair_impl(MappingObject *m);  /* dict_recovery.c */
void region_format(MappingObject *m, const Region *r);  /* dict_recovery.c */

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

static inline PyObject *
inline_int(uint64_t w)
{
    return PyLong_FromLongLong((int64_t)w >> 1);
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

#endif
