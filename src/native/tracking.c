/* tracking.c: has anything written to this memory since I last looked?
 *
 * A pool's parent copies every large array it sends into shared memory.
 * When the same array is sent again unchanged, that copy is already there
 * (shoal/_fd/_warm.py keeps it as a snapshot); what is missing is a cheap,
 * exact answer to "was it written since?".  Comparing the bytes costs as
 * much as copying them.  The kernel can answer instead:
 *
 *   track_writes(addr, length)
 *       registers the pages with a userfaultfd of this process in
 *       write-protect mode with UFFD_FEATURE_WP_ASYNC (and WP_UNPOPULATED):
 *       a write to a protected page is not delivered to any handler
 *       thread; the kernel un-protects the page and lets the write go on,
 *       at the cost of one minor fault per page.  Writes by the kernel on
 *       the process's behalf (read(2) into the buffer, process_vm_writev)
 *       fault the same way.  Then write-protects them.
 *   written(addr, length)
 *       PAGEMAP_SCAN (Linux 6.7) for a page of the range that is no longer
 *       protected (PAGE_IS_WRITTEN).  True also when the scan did not cover
 *       the whole range, or failed (a page not under this protection fails
 *       it: PM_SCAN_CHECK_WPASYNC): unsure means written.
 *   untrack_writes(addr, length)
 *       unregisters the range (which drops the protection); errors ignored
 *       (the memory may be gone).
 *
 * The caller (Python) passes page-aligned ranges of private anonymous
 * memory only: other processes can write to shared or file-backed pages
 * without faulting in this one.  track_writes returns False where the
 * kernel lacks any of this (no userfaultfd, not allowed, older than 6.7, a
 * range that another userfaultfd holds): the caller copies as before.
 *
 * The userfaultfd and /proc/self/pagemap descriptors are opened at the first
 * call and kept until stop_tracking() (the caller's registry calls it when
 * nothing is tracked any more: closing the userfaultfd unregisters every
 * range); a forked child closes its copies (tracking_after_fork): the
 * child's inherited mappings are not registered anyway, as the parent does
 * not ask for fork events.
 */
#include "shoal_native.h"

#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/utsname.h>

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif

/* PAGEMAP_SCAN (linux/fs.h of Linux >= 6.7), for older headers. */
#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start, end, categories;
};
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_SWAPPED (1 << 4)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif

/* PAGEMAP_SCAN's fast path (a scan for PAGE_IS_WRITTEN alone) read the
 * write-protect bit of entries that are not present (swapped out, being
 * migrated) as if they were, until Linux 6.9 and 6.8.10 (commit
 * 2c7ad9a590d1): a written page then swapped out could read as unwritten.
 * Older kernels are not used, and the scan asks for PAGE_IS_SWAPPED too,
 * which keeps it off that path anyway. */
static int
kernel_is_recent(void)
{
    struct utsname u;
    int major = 0, minor = 0, patch = 0;
    if (uname(&u) < 0 || sscanf(u.release, "%d.%d.%d", &major, &minor, &patch) < 2)
        return 0;
    if (major != 6)
        return major > 6;
    return minor > 8 || (minor == 8 && patch >= 10);
}

static int uffd = -1;     /* -1: not opened yet; -2: unavailable here */
static int pagemap = -1;

static void
tracking_close(void)
{
    if (uffd >= 0)
        close(uffd);
    if (pagemap >= 0)
        close(pagemap);
    if (uffd != -2)
        uffd = -1;
    pagemap = -1;
}

void
tracking_after_fork(void)
{
    tracking_close();
}

PyObject *
stop_tracking(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    tracking_close();
    Py_RETURN_NONE;
}

static int
tracking_open(void)
{
    if (uffd >= 0)
        return 1;
    if (uffd == -2)
        return 0;
    if (!kernel_is_recent())
        goto unavailable;
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && (errno == EPERM || errno == EACCES))
        /* vm.unprivileged_userfaultfd=0: user-mode faults only are allowed,
         * and the asynchronous write-protection never delivers a fault. */
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0)
        goto failed;
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        close(fd);
        goto unavailable;
    }
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) {
        int err = errno;
        close(fd);
        errno = err;
        goto failed;
    }
    /* PAGEMAP_SCAN itself (Linux >= 6.7): an empty scan succeeds. */
    struct pm_scan_arg probe = {.size = sizeof probe, .start = 0, .end = 0};
    if (ioctl(pm, PAGEMAP_SCAN, &probe) < 0) {
        close(pm);
        close(fd);
        goto unavailable;
    }
    uffd = fd;
    pagemap = pm;
    return 1;
failed:
    /* Out of descriptors or memory for a moment: try again next time. */
    if (errno == EMFILE || errno == ENFILE || errno == ENOMEM)
        return 0;
unavailable:
    uffd = -2;
    return 0;
}

PyObject *
can_track(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return PyBool_FromLong(tracking_open());
}

static int
parse_range(PyObject *const *args, Py_ssize_t nargs, const char *name, uint64_t *start, uint64_t *len)
{
    if (nargs != 2)
        return PyErr_Format(PyExc_TypeError, "%s(addr, length) takes 2 arguments", name), -1;
    unsigned long long a = PyLong_AsUnsignedLongLong(args[0]);
    if (a == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    unsigned long long n = PyLong_AsUnsignedLongLong(args[1]);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    long page = sysconf(_SC_PAGESIZE);
    if (n == 0 || a % (unsigned long long)page || n % (unsigned long long)page || a + n < a) {
        PyErr_Format(PyExc_ValueError, "%s: a range of whole pages, not %llu bytes at address %llu", name, n, a);
        return -1;
    }
    *start = a;
    *len = n;
    return 0;
}

PyObject *
track_writes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t start, len;
    if (parse_range(args, nargs, "track_writes", &start, &len) < 0)
        return NULL;
    if (!tracking_open())
        Py_RETURN_FALSE;
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        struct uffdio_range range = {.start = start, .len = len};
        (void)ioctl(uffd, UFFDIO_UNREGISTER, &range); /* whatever part it did register */
        Py_RETURN_FALSE;
    }
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        struct uffdio_range range = {.start = start, .len = len};
        (void)ioctl(uffd, UFFDIO_UNREGISTER, &range);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

PyObject *
written(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t start, len;
    if (parse_range(args, nargs, "written", &start, &len) < 0)
        return NULL;
    if (uffd < 0)
        Py_RETURN_TRUE;
    struct page_region found;
    struct pm_scan_arg arg = {
        .size = sizeof arg,
        /* A page of the range that is not under asynchronous write
         * protection (unregistered: not ours to answer for) fails the scan. */
        .flags = PM_SCAN_CHECK_WPASYNC,
        .start = start,
        .end = start + len,
        .vec = (uint64_t)(uintptr_t)&found,
        .vec_len = 1,
        .max_pages = 1,
        .category_mask = PAGE_IS_WRITTEN,
        .return_mask = PAGE_IS_WRITTEN | PAGE_IS_SWAPPED, /* not the fast path: see kernel_is_recent */
    };
    long n;
    Py_BEGIN_ALLOW_THREADS
    n = ioctl(pagemap, PAGEMAP_SCAN, &arg);
    Py_END_ALLOW_THREADS
    /* A page found, an error, or a walk that stopped early: written. */
    return PyBool_FromLong(n != 0 || arg.walk_end != start + len);
}

PyObject *
untrack_writes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t start, len;
    if (parse_range(args, nargs, "untrack_writes", &start, &len) < 0)
        return NULL;
    if (uffd >= 0) {
        struct uffdio_range range = {.start = start, .len = len};
        (void)ioctl(uffd, UFFDIO_UNREGISTER, &range);
    }
    Py_RETURN_NONE;
}
