/* lane.c: an actor connection's shared-memory lane (see shoal/_actor/_lane.py).
 *
 * A lane is a memfd both ends map: one message slot per direction (0: the
 * caller's requests, 1: the actor's replies), each a header cache line and a
 * data area of LANE_CAP bytes.  Only one message is in flight per direction
 * (a synchronous call waits for its reply before the next request), so a
 * slot is a sequence number, not a ring:
 *
 *   header of direction d at 128*d:  +0 seq (u32, the writer's count)
 *                                    +4 len (u32, the message's length)
 *                                   +64 done (u32, the reader's count)
 *                                   +68 sleeping (u32, the reader sleeps)
 *   data of direction d at LANE_HDR + d*LANE_CAP
 *
 * The writer copies the message, stores its length, then bumps seq; the
 * reader sees seq != done, copies the message out and stores done = seq.
 * A reader about to sleep sets `sleeping`, looks once more, then sleeps in
 * poll/epoll on the lane's eventfd; a writer that finds `sleeping` set after
 * its bump writes that eventfd.  Both steps are sequentially consistent, so
 * one of the two always sees the other (no lost wake-up).
 *
 * The peer is another process of the same user, but what it wrote is
 * checked like any received bytes: a length past the data area is
 * CorruptDataError, never a read out of bounds.
 */
#include "shoal_native.h"

#include <poll.h>
#include <sched.h>

#define LANE_HDR 512
#define LANE_CAP 65536
#if LANE_SIZE != LANE_HDR + 2 * LANE_CAP
#error "LANE_SIZE in shoal_native.h disagrees with lane.c"
#endif
#define O_SEQ 0
#define O_LEN 4
#define O_DONE 64
#define O_SLEEPING 68

static inline uint32_t *
word(char *base, int side, int off)
{
    return (uint32_t *)(base + 128 * side + off);
}

static int
lane_view(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len != LANE_SIZE || (uintptr_t)view->buf % 64) {
        PyErr_Format(PyExc_ValueError, "a lane is a %d-byte page-aligned mapping, not %zd bytes",
                     LANE_SIZE, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
parse_side(PyObject *obj)
{
    long side = PyLong_AsLong(obj);
    if (side == -1 && PyErr_Occurred())
        return -1;
    if (side != 0 && side != 1) {
        PyErr_SetString(PyExc_ValueError, "a lane's side is 0 (requests) or 1 (replies)");
        return -1;
    }
    return (int)side;
}

/* lane_put(lane, side, payload, efd): send one message; wake the reader
 * through efd when it sleeps. */
PyObject *
lane_put(FASTCALL_ARGS)
{
    if (check_nargs("lane_put", nargs, 4, 4) < 0)
        return NULL;
    int side = parse_side(args[1]);
    int efd = PyLong_AsLong(args[3]);
    if (side < 0 || (efd == -1 && PyErr_Occurred()))
        return NULL;
    Py_buffer view, data;
    if (lane_view(args[0], &view) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *ret = NULL;
    if (data.len > LANE_CAP) {
        PyErr_Format(PyExc_ValueError, "a lane message holds at most %d bytes, not %zd", LANE_CAP, data.len);
        goto done;
    }
    char *base = view.buf;
    memcpy(base + LANE_HDR + side * LANE_CAP, data.buf, (size_t)data.len);
    __atomic_store_n(word(base, side, O_LEN), (uint32_t)data.len, __ATOMIC_RELAXED);
    __atomic_fetch_add(word(base, side, O_SEQ), 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(word(base, side, O_SLEEPING), __ATOMIC_SEQ_CST) && efd >= 0) {
        /* The eventfd's flags belong to its open file, which the peer
         * shares: one it made blocking, with a full counter, must not
         * stop us.  A full counter wakes the reader anyway. */
        struct pollfd p = {.fd = efd, .events = POLLOUT};
        Py_BEGIN_ALLOW_THREADS
        if (poll(&p, 1, 0) > 0 && (p.revents & POLLOUT)) {
            uint64_t one = 1;
            ssize_t n = write(efd, &one, sizeof one);
            (void)n;
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&view);
    return ret;
}

/* lane_get(lane, side): the message waiting on this side, or None. */
PyObject *
lane_get(FASTCALL_ARGS)
{
    if (check_nargs("lane_get", nargs, 2, 2) < 0)
        return NULL;
    int side = parse_side(args[1]);
    if (side < 0)
        return NULL;
    Py_buffer view;
    if (lane_view(args[0], &view) < 0)
        return NULL;
    char *base = view.buf;
    PyObject *ret;
    uint32_t seq = __atomic_load_n(word(base, side, O_SEQ), __ATOMIC_ACQUIRE);
    if (seq == __atomic_load_n(word(base, side, O_DONE), __ATOMIC_RELAXED)) {
        ret = Py_NewRef(Py_None);
    } else {
        uint32_t n = __atomic_load_n(word(base, side, O_LEN), __ATOMIC_RELAXED);
        if (n > LANE_CAP) {
            PyObject *cls = corrupt_error_type();
            PyErr_Format(cls ? cls : PyExc_RuntimeError,
                         "a lane message claims %u bytes, more than the %d its slot holds", n, LANE_CAP);
            ret = NULL;
        } else {
            ret = PyBytes_FromStringAndSize(base + LANE_HDR + side * LANE_CAP, n);
        }
        __atomic_store_n(word(base, side, O_DONE), seq, __ATOMIC_RELEASE);
    }
    PyBuffer_Release(&view);
    return ret;
}

#define LANES_MAX 64

static int
ready(char *base, int side)
{
    return __atomic_load_n(word(base, side, O_SEQ), __ATOMIC_ACQUIRE) !=
           __atomic_load_n(word(base, side, O_DONE), __ATOMIC_RELAXED);
}

/* lane_wait(lanes, side, spin_us, fd, start): look for a message on `side`
 * of any lane of the tuple, without the GIL, for up to spin_us
 * microseconds, polling fd (when >= 0) every few microseconds.  Returns the
 * index of a lane with a message (the search starts at `start`, so that
 * lanes take turns); -2 when fd became readable first; -1 when nothing came:
 * then every lane's `sleeping` flag is set, and the caller sleeps on the
 * eventfds (lane_awake clears the flags). */
PyObject *
lane_wait(FASTCALL_ARGS)
{
    if (check_nargs("lane_wait", nargs, 5, 5) < 0)
        return NULL;
    if (!PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "lane_wait takes a tuple of lanes");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(args[0]);
    int side = parse_side(args[1]);
    double spin_us = PyFloat_AsDouble(args[2]);
    int fd = PyLong_AsLong(args[3]);
    Py_ssize_t start = PyLong_AsSsize_t(args[4]);
    if (side < 0 || PyErr_Occurred())
        return NULL;
    if (count > LANES_MAX) {
        PyErr_Format(PyExc_ValueError, "lane_wait watches at most %d lanes", LANES_MAX);
        return NULL;
    }
    Py_buffer views[LANES_MAX];
    char *bases[LANES_MAX];
    for (Py_ssize_t i = 0; i < count; i++) {
        if (lane_view(PyTuple_GET_ITEM(args[0], i), &views[i]) < 0) {
            while (i--)
                PyBuffer_Release(&views[i]);
            return NULL;
        }
        bases[i] = views[i].buf;
    }
    if (count)
        start = ((start % count) + count) % count;
    long found = -1;
    Py_BEGIN_ALLOW_THREADS
    double deadline = monotonic_now() + spin_us * 1e-6;
    double next_poll = 0.0;
    for (unsigned spin = 0;; spin++) {
        for (Py_ssize_t k = 0; k < count; k++) {
            Py_ssize_t i = (start + k) % count;
            if (ready(bases[i], side)) {
                found = (long)i;
                break;
            }
        }
        if (found >= 0)
            break;
        if (spin % 16 == 0) {
            double now = monotonic_now();
            if (now >= deadline)
                break;
            /* A look pays only while the peer runs: on a CPU that has
             * other work (more runnable processes than CPUs), let it go
             * first; an idle CPU returns at once. */
            sched_yield();
            if (fd >= 0 && now >= next_poll) {
                struct pollfd p = {.fd = fd, .events = POLLIN};
                if (poll(&p, 1, 0) > 0) {
                    found = -2;
                    break;
                }
                next_poll = now + 8e-6;
            }
        }
        CPU_RELAX();
    }
    if (found == -1) {
        for (Py_ssize_t i = 0; i < count; i++)
            __atomic_store_n(word(bases[i], side, O_SLEEPING), 1, __ATOMIC_SEQ_CST);
        /* The store above and the loads below must not be reordered (the
         * writer bumps seq, then loads sleeping): else both could miss. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        for (Py_ssize_t k = 0; k < count && found == -1; k++) {
            Py_ssize_t i = (start + k) % count;
            if (ready(bases[i], side))
                found = (long)i;
        }
        if (found >= 0)
            for (Py_ssize_t i = 0; i < count; i++)
                __atomic_store_n(word(bases[i], side, O_SLEEPING), 0, __ATOMIC_SEQ_CST);
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++)
        PyBuffer_Release(&views[i]);
    return PyLong_FromLong(found);
}

/* lane_awake(lanes, side): clear the `sleeping` flags lane_wait set. */
PyObject *
lane_awake(FASTCALL_ARGS)
{
    if (check_nargs("lane_awake", nargs, 2, 2) < 0)
        return NULL;
    if (!PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "lane_awake takes a tuple of lanes");
        return NULL;
    }
    int side = parse_side(args[1]);
    if (side < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[0]); i++) {
        Py_buffer view;
        if (lane_view(PyTuple_GET_ITEM(args[0], i), &view) < 0)
            return NULL;
        __atomic_store_n(word(view.buf, side, O_SLEEPING), 0, __ATOMIC_SEQ_CST);
        PyBuffer_Release(&view);
    }
    Py_RETURN_NONE;
}
