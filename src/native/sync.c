/* sync.c: atomics, the robust process-shared mutex, futex wait/wake. */
#include "shoal_native.h"

/* ------------------------------------------------------------------------
 * 1. Atomics
 * ---------------------------------------------------------------------- */

PyObject *
atomic_load(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("load", nargs, 2, 2) < 0)
        return NULL;
    int64_t *p = (int64_t *)buffer_at(args[0], args[1], 8, 8, &view);
    if (p == NULL)
        return NULL;
    int64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(v);
}

PyObject *
atomic_store(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("store", nargs, 3, 3) < 0)
        return NULL;
    long long v = PyLong_AsLongLong(args[2]);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    int64_t *p = (int64_t *)buffer_at(args[0], args[1], 8, 8, &view);
    if (p == NULL)
        return NULL;
    __atomic_store_n(p, (int64_t)v, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* fetch_add(buf, offset, delta) -> the previous value (wraps like C int64). */
PyObject *
atomic_fetch_add(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("fetch_add", nargs, 3, 3) < 0)
        return NULL;
    long long d = PyLong_AsLongLong(args[2]);
    if (d == -1 && PyErr_Occurred())
        return NULL;
    int64_t *p = (int64_t *)buffer_at(args[0], args[1], 8, 8, &view);
    if (p == NULL)
        return NULL;
    /* Unsigned addition: wrapping is defined, signed overflow is not. */
    uint64_t old = __atomic_fetch_add((uint64_t *)p, (uint64_t)d, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong((int64_t)old);
}

/* compare_exchange(buf, offset, expected, desired) -> the value found.
 * It was replaced by `desired` exactly when the result == expected. */
PyObject *
atomic_compare_exchange(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("compare_exchange", nargs, 4, 4) < 0)
        return NULL;
    long long expected = PyLong_AsLongLong(args[2]);
    if (expected == -1 && PyErr_Occurred())
        return NULL;
    long long desired = PyLong_AsLongLong(args[3]);
    if (desired == -1 && PyErr_Occurred())
        return NULL;
    int64_t *p = (int64_t *)buffer_at(args[0], args[1], 8, 8, &view);
    if (p == NULL)
        return NULL;
    int64_t e = expected;
    __atomic_compare_exchange_n(p, &e, (int64_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(e);
}

/* ------------------------------------------------------------------------
 * 2. Robust process-shared mutex
 * ---------------------------------------------------------------------- */

/* Spin before sleeping: a cross-core handoff on a VM costs ~0.25 us, a
 * futex sleep + wake 80-100 us, so a few microseconds of spinning pays.
 * Bounded by time, because PAUSE costs 10 to 140 cycles depending on the
 * CPU. */
#define SPIN_SECONDS 20e-6
/* Blocking waits sleep in slices of this many seconds so that signals
 * (KeyboardInterrupt) are handled while waiting. */
#define WAIT_SLICE 0.05
/* Every this many slices (about a second) a waiter looks at who holds the
 * lock (see holder_missing). */
#define HOLDER_CHECK_SLICES 20

int
init_robust_mutex(pthread_mutex_t *mu)
{
    pthread_mutexattr_t attr;
    int r = pthread_mutexattr_init(&attr);
    if (r == 0)
        r = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (r == 0)
        r = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    /* ERRORCHECK: relocking from the holding thread reports EDEADLK
     * instead of hanging forever. */
    if (r == 0)
        r = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    if (r == 0)
        r = pthread_mutex_init(mu, &attr);
    pthread_mutexattr_destroy(&attr);
    if (r != 0) {
        errno = r;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

void
set_lock_error(int r)
{
    if (r == EINVAL)
        PyErr_SetString(corrupt_error_type(),
                        "the lock's memory does not hold a robust process-shared mutex (EINVAL): the process "
                        "that wrote it is not shoal of this version, or the bytes were overwritten (by a C "
                        "extension, or a stray write to shared memory it holds)");
    else if (r == EDEADLK)
        PyErr_SetString(PyExc_RuntimeError,
                        "this thread already holds the lock (it is not re-entrant at this level)");
    else if (r == ENOTRECOVERABLE)
        PyErr_SetString(PyExc_OSError,
                        "the lock is unusable: a previous holder died and it was released "
                        "without being marked consistent");
    else {
        errno = r;
        PyErr_SetFromErrno(PyExc_OSError);
    }
}

/* Whether the lock `mu`, which a waiter has been refused for a while, is
 * held by nobody who could ever release it: its futex word (glibc keeps it
 * first in pthread_mutex_t: the holder's thread id, and the waiters and
 * owner-died bits) names no holder, or a thread that does not exist, and
 * did not change meanwhile.  A holder that died is marked owner-died by the
 * kernel (its robust list) and taken over by the next locker; a word naming
 * a thread that is gone without that mark was written by something else
 * than a locker: the memory was overwritten, and waiting would never end.
 * (A holder in another PID namespace would look gone too: shoal's shared
 * structures are for processes of one namespace.) */
/* Also when the word names a thread that exists (thread 1, a kernel
 * thread: a small number overwritten into it) but the mutex's owner field
 * has not named that thread at two checks in a row (*suspect keeps the
 * previous check's mismatch): glibc sets it right after taking the lock,
 * to the taker's id, or to "inconsistent" while a taker of an owner-died
 * lock repairs. */
static int
holder_missing(pthread_mutex_t *mu, uint64_t *suspect)
{
#if defined(__GLIBC__)
    unsigned *word = (unsigned *)mu;
    unsigned w = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    if (w == 0 || (w & FUTEX_OWNER_DIED))
        return 0;  /* free, or recoverable: the next attempt takes it */
    pid_t tid = (pid_t)(w & FUTEX_TID_MASK);
    if (tid != 0 && (kill(tid, 0) == 0 || errno != ESRCH)) {
        int owner = __atomic_load_n(&mu->__data.__owner, __ATOMIC_RELAXED);
        if (owner == (int)tid || owner == 0x7fffffff /* PTHREAD_MUTEX_INCONSISTENT */) {
            *suspect = 0;
            return 0;
        }
        uint64_t seen = ((uint64_t)w << 32) | (unsigned)owner;
        int twice = *suspect == seen;
        *suspect = seen;
        return twice && __atomic_load_n(word, __ATOMIC_ACQUIRE) == w;
    }
    return __atomic_load_n(word, __ATOMIC_ACQUIRE) == w;
#else
    (void)suspect;
    return 0;
#endif
}

/* Lock `mu`, with the GIL held on entry and exit.  Returns 0 (locked),
 * EOWNERDEAD (locked; the previous holder died holding it), ETIMEDOUT,
 * EDEADLK (this thread holds it already), or -1 with an exception set. */
int
lock_robust(pthread_mutex_t *mu, double timeout, int spin)
{
    int r = pthread_mutex_trylock(mu);
    if (r == 0 || r == EOWNERDEAD)
        return r;
    if (r != EBUSY)
        goto fail;
    double spin_until = spin ? monotonic_now() + SPIN_SECONDS : 0;
    while (spin) {
        for (int j = 0; j < 8; j++)
            CPU_RELAX();
        r = pthread_mutex_trylock(mu);
        if (r == 0 || r == EOWNERDEAD)
            return r;
        if (r != EBUSY)
            goto fail;
        if (monotonic_now() > spin_until)
            break;
    }
    if (timeout == 0)
        return ETIMEDOUT;
    double deadline = timeout < 0 ? 0 : monotonic_now() + timeout;
    uint64_t suspect = 0;
    for (unsigned long slices = 1;; slices++) {
        double slice = WAIT_SLICE;
        if (timeout >= 0) {
            double left = deadline - monotonic_now();
            if (left <= 0)
                return ETIMEDOUT;
            if (left < slice)
                slice = left;
        }
        /* timedlock takes CLOCK_REALTIME; the slices are short, so a clock
         * step only shortens or lengthens one slice. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long ns = ts.tv_nsec + (long long)(slice * 1e9);
        ts.tv_sec += ns / 1000000000LL;
        ts.tv_nsec = ns % 1000000000LL;
        Py_BEGIN_ALLOW_THREADS
        r = pthread_mutex_timedlock(mu, &ts);
        Py_END_ALLOW_THREADS
        if (r == 0 || r == EOWNERDEAD)
            return r;
        if (r != ETIMEDOUT)
            goto fail;
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (slices % HOLDER_CHECK_SLICES == 0 && holder_missing(mu, &suspect)) {
            PyErr_Format(corrupt_error_type(),
                         "the lock is held by no live thread (its word is 0x%x: the holder it names, thread %u, "
                         "does not exist or does not hold it, and the kernel did not mark it dead): the process that wrote it is "
                         "not shoal of this version, or the bytes were overwritten (by a C extension, or a "
                         "stray write to shared memory it holds)",
                         *(unsigned *)mu, *(unsigned *)mu & FUTEX_TID_MASK);
            return -1;
        }
    }
fail:
    if (r == EDEADLK)
        return r;
    set_lock_error(r);
    return -1;
}

PyObject *
mutex_init(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("mutex_init", nargs, 2, 2) < 0)
        return NULL;
    pthread_mutex_t *mu = (pthread_mutex_t *)buffer_at(args[0], args[1], sizeof(pthread_mutex_t), 8, &view);
    if (mu == NULL)
        return NULL;
    int r = init_robust_mutex(mu);
    PyBuffer_Release(&view);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* mutex_acquire(buf, offset, timeout=None) -> owner_died: bool.
 * Raises TimeoutError when the timeout passes.  When owner_died is True the
 * caller holds the lock, must repair the data it protects and then call
 * mutex_consistent(); releasing it without doing so makes it unusable. */
PyObject *
mutex_acquire(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    double timeout;
    if (check_nargs("mutex_acquire", nargs, 2, 3) < 0)
        return NULL;
    if (parse_timeout(nargs > 2 ? args[2] : NULL, &timeout) < 0)
        return NULL;
    pthread_mutex_t *mu = (pthread_mutex_t *)buffer_at(args[0], args[1], sizeof(pthread_mutex_t), 8, &view);
    if (mu == NULL)
        return NULL;
    int r = lock_robust(mu, timeout, 1);
    PyBuffer_Release(&view);
    if (r < 0)
        return NULL;
    if (r == EDEADLK) {
        set_lock_error(r);
        return NULL;
    }
    if (r == ETIMEDOUT) {
        PyErr_SetString(PyExc_TimeoutError, "timed out waiting for the lock");
        return NULL;
    }
    return PyBool_FromLong(r == EOWNERDEAD);
}

PyObject *
mutex_release(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("mutex_release", nargs, 2, 2) < 0)
        return NULL;
    pthread_mutex_t *mu = (pthread_mutex_t *)buffer_at(args[0], args[1], sizeof(pthread_mutex_t), 8, &view);
    if (mu == NULL)
        return NULL;
    int r = pthread_mutex_unlock(mu);
    PyBuffer_Release(&view);
    if (r == EPERM) {
        PyErr_SetString(PyExc_RuntimeError, "release of a lock this thread does not hold");
        return NULL;
    }
    if (r != 0) {
        set_lock_error(r);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *
mutex_consistent(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("mutex_consistent", nargs, 2, 2) < 0)
        return NULL;
    pthread_mutex_t *mu = (pthread_mutex_t *)buffer_at(args[0], args[1], sizeof(pthread_mutex_t), 8, &view);
    if (mu == NULL)
        return NULL;
    int r = pthread_mutex_consistent(mu);
    PyBuffer_Release(&view);
    if (r == EINVAL) {  /* not inconsistent: callers expect this one as a plain OSError */
        errno = r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (r != 0) {
        set_lock_error(r);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------
 * 3. futex wait / wake (shared, not FUTEX_PRIVATE: the word is in memory
 *    mapped by several processes)
 * ---------------------------------------------------------------------- */

/* futex_wait(buf, offset, expected, timeout=None) -> bool.
 * Sleeps while the 32-bit word at offset equals `expected`.  Returns False
 * on timeout, True otherwise (woken, the value differed, or a spurious
 * wake-up: callers re-check their condition). */
PyObject *
futex_wait(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    double timeout;
    if (check_nargs("futex_wait", nargs, 3, 4) < 0)
        return NULL;
    long long expected = PyLong_AsLongLong(args[2]);
    if (expected == -1 && PyErr_Occurred())
        return NULL;
    if (expected < INT32_MIN || expected > (long long)UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "futex_wait: expected must fit in 32 bits");
        return NULL;
    }
    if (parse_timeout(nargs > 3 ? args[3] : NULL, &timeout) < 0)
        return NULL;
    uint32_t *p = (uint32_t *)buffer_at(args[0], args[1], 4, 4, &view);
    if (p == NULL)
        return NULL;
    struct timespec ts, *tsp = NULL;
    if (timeout >= 0) {
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    long r;
    int err;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(SYS_futex, p, FUTEX_WAIT, (uint32_t)expected, tsp, NULL, 0);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (r == 0 || err == EAGAIN)
        Py_RETURN_TRUE;
    if (err == ETIMEDOUT)
        Py_RETURN_FALSE;
    if (err == EINTR) {
        if (PyErr_CheckSignals() < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* futex_wake(buf, offset, count=1) -> number of waiters woken. */
PyObject *
futex_wake(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (check_nargs("futex_wake", nargs, 2, 3) < 0)
        return NULL;
    long count = 1;
    if (nargs > 2) {
        count = PyLong_AsLong(args[2]);
        if (count == -1 && PyErr_Occurred())
            return NULL;
        if (count < 0 || count > INT32_MAX)
            count = INT32_MAX;
    }
    uint32_t *p = (uint32_t *)buffer_at(args[0], args[1], 4, 4, &view);
    if (p == NULL)
        return NULL;
    long r = syscall(SYS_futex, p, FUTEX_WAKE, (int)count, NULL, NULL, 0);
    int err = errno;
    PyBuffer_Release(&view);
    if (r < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(r);
}
