/* shoal_native.h: what the files of shoal._native share.
 *
 * The extension is split by concern, as CPython's Modules/_multiprocessing/:
 *
 *   util.c    buffer access with bounds/alignment checks, argument and
 *             timeout parsing, punch_hole (memfd ranges back to the kernel),
 *             copy_into (a memcpy without the GIL), the error for corrupt
 *             shared memory (set_corrupt_error)
 *   sync.c    1. atomics  2. robust process-shared mutex  3. futex wait/wake
 *   hash.c    4. xxh64, a hash that is the same in every process
 *   dict_*.c  5. the SharedDict core (Mapping, DictLock, dict_* operations): dict_layout.c,
 *             dict_recovery.c, dict_ops.c, sharing the private header dict.h
 *   module.c  the method table (with docstrings) and module init
 *
 * Everything declared here has external linkage inside the shared object
 * only: the build passes -fvisibility=hidden, and PyInit__native is the one
 * exported symbol.  src/shoal/_native.pyi types the Python-facing API.
 */
#ifndef SHOAL_NATIVE_H
#define SHOAL_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define FASTCALL_ARGS PyObject *mod, PyObject *const *args, Py_ssize_t nargs

/* util.c */
char *buffer_at(PyObject *obj, PyObject *offset_obj, Py_ssize_t width, Py_ssize_t align, Py_buffer *view);
int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi);
int parse_timeout(PyObject *obj, double *out);
double monotonic_now(void);
PyObject *punch_hole(FASTCALL_ARGS);
PyObject *copy_into(FASTCALL_ARGS);
PyObject *corrupt_error_type(void);
PyObject *set_corrupt_error(PyObject *mod, PyObject *cls);

/* sync.c */
PyObject *atomic_load(FASTCALL_ARGS);
PyObject *atomic_store(FASTCALL_ARGS);
PyObject *atomic_fetch_add(FASTCALL_ARGS);
PyObject *atomic_compare_exchange(FASTCALL_ARGS);
int init_robust_mutex(pthread_mutex_t *mu);
void set_lock_error(int r);
int lock_robust(pthread_mutex_t *mu, double timeout, int spin);
PyObject *mutex_init(FASTCALL_ARGS);
PyObject *mutex_acquire(FASTCALL_ARGS);
PyObject *mutex_release(FASTCALL_ARGS);
PyObject *mutex_consistent(FASTCALL_ARGS);
PyObject *futex_wait(FASTCALL_ARGS);
PyObject *futex_wake(FASTCALL_ARGS);

/* hash.c */
uint64_t xxh64(const void *data, size_t len, uint64_t seed);
PyObject *hash64(FASTCALL_ARGS);

/* region.c */
extern PyTypeObject Region_Type;

/* tracking.c */
PyObject *track_writes(FASTCALL_ARGS);
PyObject *written(FASTCALL_ARGS);
PyObject *untrack_writes(FASTCALL_ARGS);
PyObject *stop_tracking(FASTCALL_ARGS);
PyObject *can_track(FASTCALL_ARGS);
void tracking_after_fork(void);

/* lane.c */
#define LANE_SIZE (512 + 2 * 65536)
PyObject *lane_put(FASTCALL_ARGS);
PyObject *lane_get(FASTCALL_ARGS);
PyObject *lane_wait(FASTCALL_ARGS);
PyObject *lane_awake(FASTCALL_ARGS);

/* dict_*.c */
extern PyTypeObject Mapping_Type;
extern PyTypeObject DictLock_Type;
extern PyTypeObject Task_Type;

/* task.c: the pool engine's task record; its fields in Python's order */
typedef struct {
    PyObject_HEAD
    PyObject *id;
    PyObject *fn_id;
    PyObject *fn_ref;
    PyObject *mode;
    PyObject *data;
    PyObject *fds;
    PyObject *sink;
    PyObject *index;
    PyObject *timeout;
    PyObject *n;
    PyObject *kill_reason;
    PyObject *requeues;
} TaskObject;
PyObject *raw_task(FASTCALL_ARGS);

/* ring.c */
PyObject *ring_put_inline(FASTCALL_ARGS);
PyObject *ring_get_inline(FASTCALL_ARGS);
PyObject *ring_layout(void);

/* result.c */
extern PyTypeObject Result_Type;
PyObject *native_result_type(PyObject *module, PyObject *cls);
int is_plain_value(PyObject *v);
PyObject *deliver_plain(FASTCALL_ARGS);
PyObject *new_result(FASTCALL_ARGS);
PyObject *drop_skipped(FASTCALL_ARGS);
PyObject *batch_columns(FASTCALL_ARGS);
void after_fork_child(void);
PyObject *dict_init(FASTCALL_ARGS);
PyObject *dict_get(FASTCALL_ARGS);
PyObject *dict_len(FASTCALL_ARGS);
PyObject *dict_items(FASTCALL_ARGS);
PyObject *dict_put(FASTCALL_ARGS);
PyObject *dict_incr(FASTCALL_ARGS);
PyObject *dict_delete(FASTCALL_ARGS);
PyObject *dict_popitem(FASTCALL_ARGS);
PyObject *dict_stats(FASTCALL_ARGS);
PyObject *dict_set_file_size(FASTCALL_ARGS);
PyObject *dict_rebuild(FASTCALL_ARGS);
PyObject *dict_repair(FASTCALL_ARGS);
PyObject *dict_check(FASTCALL_ARGS);
PyObject *dict_lock(FASTCALL_ARGS);
PyObject *dict_unlock(FASTCALL_ARGS);
PyObject *dict_held(FASTCALL_ARGS);

/* dict.h: layout constants module.c exports */
#define DICT_MAGIC 0x3163696453414f48ULL /* "HOASdic1" little-endian */
#define HEADER_SIZE 256
#define REGION_HEADER 64
#define ENTRY 24
#define INLINE_MIN (-(1LL << 62))
#define INLINE_MAX ((1LL << 62) - 1)

#endif
