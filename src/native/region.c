/* region.c: a mapping of received shared memory that holds no descriptor.
 *
 * Python's mmap.mmap keeps a dup() of the descriptor it maps for as long as
 * it lives.  A pool's parent maps every large result it receives, and a
 * program that keeps a few thousand of them ran out of descriptors
 * (RLIMIT_NOFILE): the next message that brought descriptors could not be
 * received at all.  The kernel needs no descriptor to keep a mapping: the
 * mapping holds the open file description itself, and with it the OFD lock
 * (the "lease", see shoal/_fd/_warm.py) that tells the sender the segment
 * is still read.  A Region is that mapping and nothing else:
 *
 *     Region(fd, length, writable)
 *         writable=False: MAP_SHARED, PROT_READ (a read-only buffer; its pages
 *                         are mapped as they are read, with the kernel's
 *                         fault-around: no faster populated up front)
 *         writable=True:  MAP_PRIVATE, PROT_READ | PROT_WRITE, then
 *                         MADV_POPULATE_READ (the pages mapped in one call
 *                         without breaking copy-on-write); writes stay here
 *
 * The caller closes fd right after.  The buffer protocol exports the whole
 * region; every memoryview (and every numpy array built on one) holds a
 * reference to the Region, so it is unmapped only when the last of them is
 * gone (tp_dealloc), never under a reader.  A forked child inherits the
 * mapping, and with it the lease, until it unmaps or exits.
 *
 * Errors: ValueError for a file smaller than length (reading past its end
 * would be SIGBUS); the mmap errno as OSError (ENOMEM when the address space or the
 * kernel's count of mappings, vm.max_map_count, runs out: the caller copies
 * the bytes instead).  The system calls run without the GIL: populating a
 * large region reads every page table entry of it. */
#include "shoal_native.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux >= 5.14; older kernels refuse it (EINVAL), harmlessly */
#endif

typedef struct {
    PyObject_HEAD
    void *addr;
    Py_ssize_t len;
    int readonly;
} RegionObject;

static PyObject *
Region_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int fd, writable;
    Py_ssize_t length;
    static char *kwlist[] = {"fd", "length", "writable", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inp:Region", kwlist, &fd, &length, &writable))
        return NULL;
    if (length <= 0)
        return PyErr_Format(PyExc_ValueError, "a Region maps at least 1 byte, not %zd", length);
    /* Pages beyond the end of the file would be SIGBUS when read, not an
     * error: a file smaller than announced is refused here, as mmap.mmap
     * does.  (shoal's memfds are sealed against shrinking when made; a
     * received one is not checked again here, as with mmap.mmap.) */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (S_ISREG(st.st_mode) && st.st_size < length)
        return PyErr_Format(PyExc_ValueError, "the file holds %lld bytes, fewer than the %zd to map",
                            (long long)st.st_size, length);
    void *addr;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    if (writable) {
        addr = mmap(NULL, (size_t)length, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (addr != MAP_FAILED)
            (void)madvise(addr, (size_t)length, MADV_POPULATE_READ);
    } else {
        addr = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED, fd, 0);
    }
    if (addr == MAP_FAILED)
        err = errno;
    Py_END_ALLOW_THREADS
    if (addr == MAP_FAILED) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    RegionObject *r = (RegionObject *)type->tp_alloc(type, 0);
    if (r == NULL) {
        munmap(addr, (size_t)length);
        return NULL;
    }
    r->addr = addr;
    r->len = length;
    r->readonly = !writable;
    return (PyObject *)r;
}

static void
Region_dealloc(RegionObject *r)
{
    if (r->addr != NULL) {
        void *addr = r->addr;
        size_t len = (size_t)r->len;
        r->addr = NULL;
        Py_BEGIN_ALLOW_THREADS
        munmap(addr, len);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int
Region_getbuffer(RegionObject *r, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)r, r->addr, r->len, r->readonly, flags);
}

static PyObject *
Region_get_length(RegionObject *r, void *unused)
{
    return PyLong_FromSsize_t(r->len);
}

static PyBufferProcs Region_as_buffer = {
    .bf_getbuffer = (getbufferproc)Region_getbuffer,
};

static PyGetSetDef Region_getset[] = {
    {"length", (getter)Region_get_length, NULL, NULL, NULL},
    {NULL},
};

PyTypeObject Region_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shoal._native.Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_as_buffer = &Region_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Region(fd, length, writable): a mapping of fd that keeps no descriptor (close fd "
              "after); read-only and shared, or writable and private (copy-on-write). Unmapped when "
              "the last buffer exported from it is gone.",
    .tp_getset = Region_getset,
    .tp_new = Region_new,
};
