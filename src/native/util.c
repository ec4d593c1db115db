/* util.c: buffer access, argument parsing, memfd hole punching, the error
 * for corrupt shared memory. */
#include "shoal_native.h"

/* ------------------------------------------------------------------------
 * The error for shared memory that does not hold what shoal writes
 * ---------------------------------------------------------------------- */

static PyObject *corrupt_error;  /* shoal.CorruptDataError, once registered */

/* What the native core raises for corrupt shared memory: the class
 * shoal._fd registers at import (shoal.CorruptDataError; the exceptions
 * module is a sibling of this extension, which therefore does not import
 * it), RuntimeError before that. */
PyObject *
corrupt_error_type(void)
{
    return corrupt_error ? corrupt_error : PyExc_RuntimeError;
}

/* set_corrupt_error(cls) */
PyObject *
set_corrupt_error(PyObject *mod, PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "set_corrupt_error() takes an exception class");
        return NULL;
    }
    Py_XSETREF(corrupt_error, Py_NewRef(cls));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------
 * Buffer access with bounds and alignment checks
 * ---------------------------------------------------------------------- */

/* Borrow a writable buffer and return the address of `width` bytes at
 * `offset`, aligned to `align`.  The caller releases `view`. */
char *
buffer_at(PyObject *obj, PyObject *offset_obj, Py_ssize_t width, Py_ssize_t align, Py_buffer *view)
{
    Py_ssize_t offset = PyLong_AsSsize_t(offset_obj);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (offset < 0 || width > view->len || offset > view->len - width) {
        PyErr_Format(PyExc_IndexError,
                     "offset %zd out of range for a %zd-byte access in a buffer of %zd bytes",
                     offset, width, view->len);
        PyBuffer_Release(view);
        return NULL;
    }
    char *p = (char *)view->buf + offset;
    if ((uintptr_t)p % (uintptr_t)align) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd is not %zd-byte aligned (atomic access needs natural alignment)",
                     offset, align);
        PyBuffer_Release(view);
        return NULL;
    }
    return p;
}

int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi)
{
    if (nargs < lo || nargs > hi) {
        if (lo == hi)
            PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, lo, nargs);
        else
            PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", name, lo, hi, nargs);
        return -1;
    }
    return 0;
}

/* None or a number of seconds >= 0 (inf: none); -1.0 means "no timeout". */
int
parse_timeout(PyObject *obj, double *out)
{
    if (obj == NULL || obj == Py_None) {
        *out = -1.0;
        return 0;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (t < 0 || t != t) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a number >= 0 or None");
        return -1;
    }
    /* inf, and anything beyond ~31 years (which would overflow a time_t
     * deadline), means no timeout. */
    *out = t >= 1e9 ? -1.0 : t;
    return 0;
}

double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* punch_hole(fd, offset, length): give a range of a memfd back to the
 * kernel (it reads as zeros afterwards; the file size is unchanged). */
PyObject *
punch_hole(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("punch_hole", nargs, 3, 3) < 0)
        return NULL;
    int fd = PyLong_AsLong(args[0]);
    long long off = PyLong_AsLongLong(args[1]), len = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* copy_into(dst, src): copy the bytes of src (any contiguous buffer) to
 * the start of dst (a writable buffer at least as large) without holding
 * the GIL, so a large copy does not stall the process's other threads
 * (a pool's scheduler waiting to hand work to idle workers). */
PyObject *
copy_into(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("copy_into", nargs, 2, 2) < 0)
        return NULL;
    Py_buffer dst, src;
    if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (src.len > dst.len) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "copy_into: the destination is smaller than the source");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    memcpy(dst.buf, src.buf, (size_t)src.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}
