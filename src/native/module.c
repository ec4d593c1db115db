/* shoal._native: what Python cannot reach (module.c: the method table).
 *
 * 1. Atomics on 64-bit words at an offset in any writable buffer (mmap,
 *    bytearray, a shoal Segment's mmap): load, store, fetch_add,
 *    compare_exchange.  All sequentially consistent: these are for shared
 *    memory between processes, where being wrong is worse than 2 ns.
 * 2. A process-shared *robust* pthread mutex living in a shared buffer.  When
 *    its holder dies, the next locker is told (owner_died=True) so it can
 *    repair what the dead holder was doing, then mark it consistent.
 *    Waiters spin briefly, then block without the GIL in short slices so
 *    Ctrl-C is still seen.
 * 3. futex wait / wake on a 32-bit word in shared memory (no GIL while
 *    waiting).
 * 4. xxh64, a stable 64-bit hash: hash() differs between processes started
 *    with spawn, so nothing shared may depend on it.
 * 5. The hot paths of shoal.SharedDict (the layout is described in
 *    shoal/_shm/_dict.py and again above the dict section below): a
 *    lock-free get, and put / delete / incr / rebuild under the dict's robust
 *    mutex.  They are in C because each is one call here versus a dozen
 *    calls and struct unpackings from Python, and because lock-free readers
 *    need real memory-ordering guarantees that pure Python cannot give.
 * 6. Region (region.c): a mapping of received shared memory that, unlike
 *    mmap.mmap, keeps no descriptor open, so results kept by the thousand
 *    do not use up RLIMIT_NOFILE.
 * 7. Write tracking (tracking.c): whether an array sent before was written
 *    since, answered by the kernel (userfaultfd write protection and
 *    PAGEMAP_SCAN) instead of comparing its bytes.
 * 8. Lanes (lane.c): the shared-memory message slots that carry an actor's
 *    synchronous calls and replies, looked for without the GIL.
 *
 * Linux only (memfd, futex, robust mutexes).  No global state besides a fork
 * counter, a cached reference to pickle.loads, the count of SharedDict
 * mappings (for the error message when address space runs out) and the
 * write-tracking descriptors (a userfaultfd and /proc/self/pagemap).
 */
#include "shoal_native.h"

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))name, METH_FASTCALL, doc}
#define FAST_AS(pyname, cname, doc) {pyname, (PyCFunction)(void (*)(void))cname, METH_FASTCALL, doc}

static PyMethodDef native_methods[] = {
    /* util.c */
    FAST(punch_hole, "punch_hole(fd, offset, length)\n--\n\n"
                     "Give a range of a memfd back to the kernel; it reads as zeros afterwards."),
    FAST(copy_into, "copy_into(dst, src)\n--\n\n"
                    "Copy the bytes of src to the start of dst (at least as large) without holding the GIL."),
    /* sync.c */
    FAST_AS("load", atomic_load, "load(buf, offset)\n--\n\nThe int64 at offset in a writable buffer, read atomically."),
    FAST_AS("store", atomic_store, "store(buf, offset, value)\n--\n\nStore an int64 at offset, atomically."),
    FAST_AS("fetch_add", atomic_fetch_add, "fetch_add(buf, offset, delta)\n--\n\n"
                                           "Add delta atomically; return the previous value (wraps at 64 bits)."),
    FAST_AS("compare_exchange", atomic_compare_exchange, "compare_exchange(buf, offset, expected, desired)\n--\n\n"
            "Store desired iff the value is expected; return the value found."),
    FAST(mutex_init, "mutex_init(buf, offset)\n--\n\nMake a robust process-shared mutex at offset."),
    FAST(mutex_acquire, "mutex_acquire(buf, offset, timeout=None)\n--\n\n"
                        "Lock it; return True when the previous holder died holding it (repair, then "
                        "mutex_consistent). TimeoutError after timeout seconds."),
    FAST(mutex_release, "mutex_release(buf, offset)\n--\n\nUnlock a mutex this thread holds."),
    FAST(mutex_consistent, "mutex_consistent(buf, offset)\n--\n\n"
                           "Mark an owner-died mutex usable again, after repairing what it protects."),
    FAST(futex_wait, "futex_wait(buf, offset, expected, timeout=None)\n--\n\n"
                     "Sleep while the 32-bit word at offset equals expected; False on timeout."),
    FAST(futex_wake, "futex_wake(buf, offset, count=1)\n--\n\nWake up to count waiters; return how many woke."),
    /* hash.c */
    FAST(hash64, "hash64(data, seed=0)\n--\n\nxxh64 of a bytes-like object: the same in every process."),
    /* dict_*.c: called only by shoal._shm._dict.SharedDict, with the dict's Mapping first */
    FAST(dict_init, "dict_init(mapping, file_size)\n--\n\nFormat a new, empty dict in the mapped memfd."),
    FAST(dict_get, "dict_get(mapping, key, missing)\n--\n\n"
                   "The value of an encoded key, or missing; lock-free and never torn."),
    FAST(dict_len, "dict_len(mapping)\n--\n\nThe number of live entries; lock-free."),
    FAST(dict_items, "dict_items(mapping, what)\n--\n\n"
                     "Entries in insertion order: what=0 encoded keys, 1 values, 2 (key, value) pairs."),
    FAST(dict_put, "dict_put(mapping, key, value)\n--\n\nStore a value; False when the dict must grow first."),
    FAST(dict_incr, "dict_incr(mapping, key, n, default)\n--\n\n"
                    "Add n to an inline int atomically; None when the caller must take the slow path."),
    FAST(dict_delete, "dict_delete(mapping, key, missing, want=True)\n--\n\n"
                      "Remove a key; return its value (True when not want), or missing."),
    FAST(dict_popitem, "dict_popitem(mapping)\n--\n\n"
                       "Remove the last inserted entry; return (encoded key, value), or None when empty."),
    FAST(dict_stats, "dict_stats(mapping)\n--\n\n"
                     "(file_size, region_off, region_size, live, live_bytes); the lock is held."),
    FAST(dict_set_file_size, "dict_set_file_size(mapping, n)\n--\n\n"
                             "Publish a larger file size after growing the memfd; the lock is held."),
    FAST(dict_rebuild, "dict_rebuild(mapping, off, lgcap, size, empty=False)\n--\n\n"
                       "Copy the live entries into a new region and publish it; None when they do not fit."),
    FAST(dict_repair, "dict_repair(mapping)\n--\n\nRecompute the counters after a holder died; the lock is held."),
    FAST(dict_check, "dict_check(mapping)\n--\n\n"
                     "Verify every invariant under the lock; return the count (RuntimeError names a violation)."),
    FAST(dict_lock, "dict_lock(mapping, timeout=None)\n--\n\n"
                    "Take the dict's lock, re-entrant per thread; return True when a holder had died."),
    FAST(dict_unlock, "dict_unlock(mapping)\n--\n\nRelease the dict's lock one level."),
    FAST(dict_held, "dict_held(mapping)\n--\n\nWhether this thread holds the dict's lock."),
    /* task.c */
    FAST(raw_task, "raw_task(id, fn_id, fn_ref, mode, args, sink, timeout, limit)\n--\n\n"
                   "A Task carrying the argument tuple itself when every argument is a plain immutable "
                   "value (str and bytes shorter than limit), else None."),
    /* ring.c: called only by shoal._ipc._ring.Ring */
    FAST(ring_put_inline, "ring_put_inline(mm, capacity, payload)\n--\n\n"
                          "Append one inline record: 1 done, 0 take the general path, 2 the lock came from "
                          "a dead holder (held: repair, then release)."),
    FAST(ring_get_inline, "ring_get_inline(mm, capacity, timeout=None)\n--\n\n"
                          "Take the oldest record if it is inline and there now: its bytes, None (take the "
                          "general path) or False (the lock came from a dead holder: held, repair, then release)."),
    /* tracking.c: called only by shoal._fd._warm */
    FAST(track_writes, "track_writes(addr, length)\n--\n\n"
                       "Write-protect whole pages of private memory so that written() can tell whether "
                       "anything wrote to them since; False where the kernel cannot."),
    FAST(written, "written(addr, length)\n--\n\n"
                  "Whether a page of a tracked range was written since track_writes (True when unsure)."),
    FAST(untrack_writes, "untrack_writes(addr, length)\n--\n\nStop tracking the range."),
    FAST(can_track, "can_track()\n--\n\nWhether this kernel and process can track writes (opens what it needs)."),
    FAST(stop_tracking, "stop_tracking()\n--\n\n"
                        "Close the descriptors write tracking uses (every range stops being tracked)."),
    /* lane.c: called only by shoal._actor._lane */
    FAST(lane_put, "lane_put(lane, side, payload, efd)\n--\n\n"
                   "Send one message on a side of an actor's lane; write efd when its reader sleeps."),
    FAST(lane_get, "lane_get(lane, side)\n--\n\nThe message waiting on a side of the lane, or None."),
    FAST(lane_wait, "lane_wait(lanes, side, spin_us, fd, start)\n--\n\n"
                    "Look for a message on any lane without the GIL: its index, -2 when fd is readable "
                    "first, -1 when none came (the lanes' sleeping flags are then set)."),
    FAST(lane_awake, "lane_awake(lanes, side)\n--\n\nClear the sleeping flags lane_wait set."),
    /* result.c */
    FAST(new_result, "new_result(engine, callback, error_callback, pool)\n--\n\n"
                     "A new instance of the plain result class (see result_type)."),
    FAST(deliver_plain, "deliver_plain(tasks, kinds, values, start, raw)\n--\n\n"
                        "Deliver plain successful outcomes from index start on; return the index of the "
                        "first one that needs the general path (the pool scheduler's result loop)."),
    FAST(batch_columns, "batch_columns(batch)\n--\n\n"
                        "(ids, fn_ids, modes, datas, nfds, timed): a batch of tasks as the lists a worker "
                        "gets (nfds None when no task has descriptors) and how many have a time limit."),
    FAST(drop_skipped, "drop_skipped(batch)\n--\n\n"
                       "Remove the tasks whose sink says skip() from the list, in place; return them."),
    {"set_corrupt_error", (PyCFunction)set_corrupt_error, METH_O,
     "set_corrupt_error(cls)\n--\n\nThe exception the SharedDict core raises for memory that does not hold "
     "what shoal writes (shoal.CorruptDataError; RuntimeError until one is set)."},
    {"result_type", (PyCFunction)native_result_type, METH_O,
     "result_type(cls)\n--\n\nMake cls (a ResultSlot subclass) the plain result class: its instances "
     "without callbacks are not tracked by the garbage collector while they wait."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "shoal._native",
    "Native core of shoal: atomics, a robust process-shared mutex, futex wait/wake, xxh64 and the "
    "SharedDict core (sources: src/native/).",
    -1, native_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&Mapping_Type) < 0 || PyType_Ready(&DictLock_Type) < 0 || PyType_Ready(&Task_Type) < 0 ||
        PyType_Ready(&Result_Type) < 0 || PyType_Ready(&Region_Type) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&native_module);
    if (mod == NULL)
        return NULL;
    static int atfork_done;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_done = 1;
    }
    Py_INCREF(&Mapping_Type);
    Py_INCREF(&DictLock_Type);
    Py_INCREF(&Task_Type);
    Py_INCREF(&Result_Type);
    Py_INCREF(&Region_Type);
    if (PyModule_AddObject(mod, "Mapping", (PyObject *)&Mapping_Type) < 0 ||
        PyModule_AddObject(mod, "DictLock", (PyObject *)&DictLock_Type) < 0 ||
        PyModule_AddObject(mod, "Task", (PyObject *)&Task_Type) < 0 ||
        PyModule_AddObject(mod, "ResultSlot", (PyObject *)&Result_Type) < 0 ||
        PyModule_AddObject(mod, "Region", (PyObject *)&Region_Type) < 0 ||
        PyModule_AddIntConstant(mod, "LANE_SIZE", LANE_SIZE) < 0 ||
        PyModule_AddIntConstant(mod, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0 ||
        PyModule_AddIntConstant(mod, "DICT_HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(mod, "DICT_REGION_HEADER", REGION_HEADER) < 0 ||
        PyModule_AddIntConstant(mod, "DICT_ENTRY_SIZE", ENTRY) < 0 ||
        PyModule_AddObject(mod, "DICT_MAGIC", PyLong_FromUnsignedLongLong(DICT_MAGIC)) < 0 ||
        PyModule_AddObject(mod, "INLINE_MIN", PyLong_FromLongLong(INLINE_MIN)) < 0 ||
        PyModule_AddObject(mod, "INLINE_MAX", PyLong_FromLongLong(INLINE_MAX)) < 0 ||
        PyModule_AddObject(mod, "RING_LAYOUT", ring_layout()) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
