/* ring.c: the queue ring's one-item fast paths, one call each.
 *
 * The ring's layout (offsets, records, the two robust mutexes, the wait
 * counters and futex words) is described in shoal/_ipc/_ring.py, which
 * passes RING_LAYOUT below to check that both agree.  These functions do
 * what Ring.put_inline and Ring.get_inline did in a dozen calls from
 * Python, under the same locks and with the same checks; anything unusual
 * (no room, nothing there, a record that is not inline, positions that do
 * not add up) returns "take the general path", which waits, or raises the
 * error that names what is wrong.  A previous holder that died holding the
 * lock is reported with the lock held, so that Python repairs the counts
 * before anything else runs.
 */
#include "shoal_native.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ring's records are little-endian (struct '<II' in shoal/_ipc/_ring.py)"
#endif

#define R_PMUTEX 0
#define R_CMUTEX 64
#define R_TAIL 128
#define R_PUTS 136
#define R_PWAIT 152
#define R_HEAD 192
#define R_GETS 200
#define R_CWAIT 208
#define R_NOT_EMPTY 256
#define R_NOT_FULL 320
#define R_DATA 512
#define R_INLINE 0

/* What Ring.put_inline / Ring.get_inline return to their caller. */
#define PUT_DONE 1
#define GENERAL_PATH 0
#define OWNER_DIED 2

static inline int64_t
ld(char *b, int off)
{
    return __atomic_load_n((int64_t *)(b + off), __ATOMIC_SEQ_CST);
}

static inline void
st(char *b, int off, int64_t v)
{
    __atomic_store_n((int64_t *)(b + off), v, __ATOMIC_SEQ_CST);
}

/* Bump the futex word at `off` (a 64-bit counter whose low half is the
 * word) and wake up to `n` of its waiters: Ring._notify's steps. */
static inline void
wake(char *b, int off, int n)
{
    __atomic_fetch_add((uint64_t *)(b + off), 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, (uint32_t *)(b + off), FUTEX_WAKE, n, NULL, NULL, 0);
}

/* The ring's mapping and its capacity, checked: a buffer too small for the
 * capacity the caller claims would let a position index past its end. */
static char *
ring_buffer(PyObject *mm, PyObject *cap_obj, Py_ssize_t *cap, Py_buffer *view)
{
    *cap = PyLong_AsSsize_t(cap_obj);
    if (*cap == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(mm, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (*cap <= 0 || *cap % 8 || view->len < R_DATA || view->len - R_DATA < *cap ||
        (uintptr_t)view->buf % 8) {
        PyErr_Format(PyExc_ValueError, "a ring of capacity %zd does not fit a buffer of %zd bytes", *cap,
                     view->len);
        PyBuffer_Release(view);
        return NULL;
    }
    return (char *)view->buf;
}

/* Lock `mu` (blocking up to `timeout`; < 0: no limit) as mutex_acquire
 * does.  Returns 0 (locked), OWNER_DIED (locked, from a dead holder),
 * ETIMEDOUT, or -1 with an exception set. */
static int
ring_lock(pthread_mutex_t *mu, double timeout)
{
    int r = lock_robust(mu, timeout, 1);
    if (r == 0 || r == ETIMEDOUT || r == -1)
        return r;
    if (r == EOWNERDEAD)
        return OWNER_DIED;
    set_lock_error(r); /* EDEADLK */
    return -1;
}

/* ring_put_inline(mm, capacity, payload) -> 1 (put), 0 (take the general
 * path: no room right now, or odd positions), 2 (the producers' lock was
 * taken from a holder that died: it is held, repair then release). */
PyObject *
ring_put_inline(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("ring_put_inline", nargs, 3, 3) < 0)
        return NULL;
    Py_ssize_t cap;
    Py_buffer view, data;
    char *b = ring_buffer(args[0], args[1], &cap, &view);
    if (b == NULL)
        return NULL;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    long result = GENERAL_PATH;
    pthread_mutex_t *mu = (pthread_mutex_t *)(b + R_PMUTEX);
    int r = ring_lock(mu, -1);
    if (r < 0)
        goto error;
    if (r == OWNER_DIED) {
        result = OWNER_DIED;
        goto done;
    }
    int64_t tail = ld(b, R_TAIL), puts = ld(b, R_PUTS), head = ld(b, R_HEAD);
    int64_t length = data.len;
    int64_t need = 8 + ((length + 7) & ~(int64_t)7);
    /* Positions another process wrote are checked before any arithmetic
     * on them: out of [0, 2**62) they could overflow it. */
    int64_t used = ((uint64_t)(tail | puts | head) >> 62) ? -1 : tail - head;
    if (length > UINT32_MAX || used < 0 || cap - used < need || (tail & 7)) {
        pthread_mutex_unlock(mu);
        goto done; /* the general path waits, or raises on a corrupt ring */
    }
    char *d = b + R_DATA;
    int64_t off = tail % cap;
    uint32_t header[2] = {(uint32_t)length, R_INLINE};
    memcpy(d + off, header, 8); /* never wraps: positions and capacity are multiples of 8 */
    off += 8;
    if (off == cap)
        off = 0;
    int64_t first = cap - off;
    if (length <= first) {
        memcpy(d + off, data.buf, (size_t)length);
    }
    else {
        memcpy(d + off, data.buf, (size_t)first);
        memcpy(d, (char *)data.buf + first, (size_t)(length - first));
    }
    st(b, R_PUTS, puts + 1);
    st(b, R_TAIL, tail + need); /* publishes the record */
    if (ld(b, R_CWAIT) > 0)
        wake(b, R_NOT_EMPTY, 1);
    pthread_mutex_unlock(mu);
    result = PUT_DONE;
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&view);
    return PyLong_FromLong(result);
error:
    PyBuffer_Release(&data);
    PyBuffer_Release(&view);
    return NULL;
}

/* ring_get_inline(mm, capacity, timeout=None) -> bytes (the oldest record,
 * taken), None (take the general path: nothing there, not inline, odd
 * positions, or the lock not had within timeout), or False (the consumers'
 * lock was taken from a holder that died: it is held, repair then release). */
PyObject *
ring_get_inline(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("ring_get_inline", nargs, 2, 3) < 0)
        return NULL;
    double timeout;
    if (parse_timeout(nargs > 2 ? args[2] : NULL, &timeout) < 0)
        return NULL;
    Py_ssize_t cap;
    Py_buffer view;
    char *b = ring_buffer(args[0], args[1], &cap, &view);
    if (b == NULL)
        return NULL;
    PyObject *out = NULL;
    pthread_mutex_t *mu = (pthread_mutex_t *)(b + R_CMUTEX);
    int r = ring_lock(mu, timeout);
    if (r < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (r == ETIMEDOUT)
        goto general;
    if (r == OWNER_DIED) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    int64_t head = ld(b, R_HEAD), gets = ld(b, R_GETS), tail = ld(b, R_TAIL);
    /* (The range first: out of [0, 2**62) a subtraction could overflow.) */
    if (((uint64_t)(head | tail | gets) >> 62) || head == tail || tail - head > cap || (head & 7))
        goto unlock; /* empty (the general path waits), or corrupt (it raises) */
    char *d = b + R_DATA;
    int64_t off = head % cap;
    uint32_t header[2];
    memcpy(header, d + off, 8);
    int64_t length = header[0];
    int64_t need = 8 + ((length + 7) & ~(int64_t)7);
    if (header[1] != R_INLINE || need > tail - head)
        goto unlock;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
    if (out == NULL) {
        pthread_mutex_unlock(mu);
        PyBuffer_Release(&view);
        return NULL;
    }
    char *dst = PyBytes_AS_STRING(out);
    off += 8;
    if (off == cap)
        off = 0;
    int64_t first = cap - off;
    if (length <= first) {
        memcpy(dst, d + off, (size_t)length);
    }
    else {
        memcpy(dst, d + off, (size_t)first);
        memcpy(dst + first, d, (size_t)(length - first));
    }
    st(b, R_GETS, gets + 1);
    st(b, R_HEAD, head + need); /* frees the space */
    if (ld(b, R_PWAIT) > 0 && cap - (tail - head - need) >= cap / 4)
        wake(b, R_NOT_FULL, 1 << 30);
unlock:
    pthread_mutex_unlock(mu);
general:
    PyBuffer_Release(&view);
    if (out == NULL)
        Py_RETURN_NONE;
    return out;
}

/* The offsets and record kind above, for shoal/_ipc/_ring.py to compare
 * with its own at import: (PMUTEX, CMUTEX, TAIL, PUTS, PWAIT, HEAD, GETS,
 * CWAIT, NOT_EMPTY, NOT_FULL, DATA, INLINE). */
PyObject *
ring_layout(void)
{
    return Py_BuildValue("(iiiiiiiiiiii)", R_PMUTEX, R_CMUTEX, R_TAIL, R_PUTS, R_PWAIT, R_HEAD, R_GETS, R_CWAIT,
                         R_NOT_EMPTY, R_NOT_FULL, R_DATA, R_INLINE);
}
