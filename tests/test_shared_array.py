"""SharedArray / SharedArray.from_array, and large buffers through pools without copies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest

import shoal
import workers
from shoal import _native

np = pytest.importorskip("numpy")

BIG = 300_000  # float64 elements: 2.4 MB, above the out-of-band threshold


def _memfd_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("/memfd:shoal ", "/memfd:shoal-buffers")):
            out.append(target)
    return out


# -- the array itself ------------------------------------------------------------


def test_behaves_as_a_numpy_array():
    a = shoal.SharedArray((3, 4), dtype=np.int64)
    assert isinstance(a, np.ndarray) and isinstance(a, shoal.SharedArray)
    assert a.shape == (3, 4) and a.dtype == np.int64 and not a.any()
    a[:] = np.arange(12).reshape(3, 4)
    assert a[1, 2] == 6 and a.sum() == 66
    assert isinstance(a[1:], shoal.SharedArray) and isinstance(a.T, shoal.SharedArray)
    # Results that do not share the memory are plain arrays, as with numpy.memmap.
    assert type(a + 1) is np.ndarray and type(np.sqrt(a)) is np.ndarray
    assert type(a.copy()) is np.ndarray and type(a[[0, 2]]) is np.ndarray
    assert repr(shoal.SharedArray(2)) == "SharedArray([0., 0.])"


# Each call gives on a SharedArray what it gives on a plain ndarray holding the
# same numbers: the same type and the same value.  Reductions gave 0-d arrays
# (array(45.) where numpy gives np.float64(45.0)), which round(), dict keys,
# isinstance(x, float) and "%d" refused, and which looked like arrays in output.
SAME_AS_NUMPY = [
    "a.sum()",
    "a.mean()",
    "a.std()",
    "a.var()",
    "a.min()",
    "a.max()",
    "a.argmax()",
    "a.argmin()",
    "a.prod()",
    "a.ptp()" if hasattr(np.ndarray, "ptp") else "np.ptp(a)",
    "a.cumsum()",
    "a.dot(a)",
    "a @ a",
    "a[3]",
    "a[-1]",
    "a.item(3)",
    "a.tolist()",
    "a == 3",
    "a > 4.5",
    "(a > 4.5).sum()",
    "a[3] == 3",
    "a[3] + 1",
    "a + 1",
    "-a",
    "a * a",
    "divmod(a, 3)",
    "np.sum(a)",
    "np.mean(a)",
    "np.median(a)",
    "np.percentile(a, 50)",
    "np.average(a, weights=a)",
    "np.linalg.norm(a)",
    "np.dot(a, a)",
    "np.matmul(a, a)",
    "np.any(a)",
    "np.all(a)",
    "(a >= 0).all()",
    "np.sqrt(a[4])",
    "np.exp(a[1])",
    "np.maximum(a[2], a[3])",
    "np.add.reduce(a)",
    "np.minimum.reduce(a)",
    "np.nansum(a)",
    "np.count_nonzero(a)",
    "np.isclose(a[3], 3.0)",
    "np.allclose(a, a)",
    "np.where(a > 6)",
    "np.sort(a)[::-1]",
    "np.unique(a % 3)",
    "a.astype(np.int32)",
    "a.reshape(2, 5).sum(axis=0)",
    "a.reshape(2, 5).max(axis=1)",
    "a.reshape(2, 5).mean()",
    "a.reshape(2, 5)[1, 2]",
    "a.reshape(2, 5).trace()",
    "a.reshape(2, 5) @ a.reshape(5, 2)",
    "np.linalg.det(a[:4].reshape(2, 2))",
    "np.linalg.inv(a[:4].reshape(2, 2) + 1)",
    "float(a.sum())",
    "int(a.max())",
    "round(a.mean(), 1)",
    "round(a.std(), 3)",
    "math.isclose(a.mean(), 4.5)",
    "isinstance(a.sum(), float)",
    "isinstance(a[3], float)",
    "{a.max(): 'top', a.min(): 'bottom'}",
    "json.dumps(a.mean())",
    "json.dumps([a.sum(), a[2]])",
    "'%.1f %d' % (a.mean(), a.argmax())",
    "f'{a.sum():.2f}'",
    "repr(a.sum())",
    "str(a.max())",
    "a.sum().dtype",
    "a.sum(keepdims=True)",
    "a.sum(dtype=np.int64)",
    "np.float32(a.sum())",
]


def _same(got, want) -> None:
    assert type(got) is type(want), f"{type(got).__name__} where numpy gives {type(want).__name__}"
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    else:
        assert got == want


@pytest.mark.parametrize("code", SAME_AS_NUMPY)
def test_every_result_is_what_numpy_gives(code):
    import json
    import math

    plain = np.arange(10, dtype=np.float64)
    shared = shoal.SharedArray(10)
    shared[:] = plain
    want = eval(code, {"np": np, "json": json, "math": math, "a": plain})
    got = eval(code, {"np": np, "json": json, "math": math, "a": shared})
    _same(got, want)
    del shared, got


# New memory computed from a SharedArray is private: a result that claimed to
# be a SharedArray (a.astype(), np.zeros_like(a) did) was copied, not shared,
# when handed to a worker, so what the worker wrote was lost.
NEW_ARRAYS = [
    "a.astype(np.float32)",
    "a.T.flatten()",
    "a.T.ravel()",
    "a.T.reshape(-1)",
    "a.repeat(2)",
    "a.take([0, 2])",
    "a.compress([True, False, True])",
    "a.argsort()",
    "a.byteswap()",
    "a.dot(a.T)",
    "a.imag",
    "a[[0, 2]]",
    "a[a > 3]",
    "np.zeros_like(a)",
    "np.empty_like(a)",
    "np.ones_like(a)",
    "np.full_like(a, 7)",
    "np.copy(a, subok=True)",
    "np.roll(a, 1)",
    "np.tile(a, 2)",
    "np.nan_to_num(a)",
    "np.gradient(a)[0]",
    "np.add(a, 1)",
    "np.cumsum(a, axis=0)",
]


@pytest.mark.parametrize("code", NEW_ARRAYS)
def test_new_arrays_computed_from_it_are_plain_arrays(code):
    a = shoal.SharedArray((3, 4))
    a[:] = np.arange(12).reshape(3, 4)
    got = eval(code, {"np": np, "a": a})
    want = eval(code, {"np": np, "a": np.array(a)})
    del a
    assert type(got) is np.ndarray and got.shape == want.shape and got.dtype == want.dtype
    assert "empty" in code or np.array_equal(got, want)  # empty_like: memory left as it was


VIEWS = [
    "a[1:]",
    "a.T",
    "a[..., 2]",
    "a[1, 2, ...]",
    "a.reshape(-1)",
    "a.ravel()",
    "a.real",
    "a.view(np.int8)",
]


@pytest.mark.parametrize("code", VIEWS)
def test_views_stay_shared_arrays_of_the_same_memory(code):
    # A 0-d view (a[1, 2, ...]) is memory of the array, not a number: it stays
    # a SharedArray, as a plain ndarray's 0-d view stays an ndarray.
    a = shoal.SharedArray((3, 4))
    view = eval(code, {"np": np, "a": a})
    assert type(view) is shoal.SharedArray
    view[...] = 5
    assert (a != 0).any()
    del a, view


def test_operations_into_shared_memory_return_it():
    a = shoal.SharedArray(4)
    assert np.add(a, 1, out=a) is a and a.tolist() == [1.0] * 4
    a += 1
    assert type(a) is shoal.SharedArray and a.tolist() == [2.0] * 4
    total = a[:1].reshape(())
    assert np.sum(a, out=total) is total and a[0] == 8.0
    del a, total


def test_from_array_copies_shape_dtype_and_order():
    src = np.asfortranarray(np.arange(20, dtype=np.float32).reshape(4, 5))
    a = shoal.SharedArray.from_array(src)
    assert isinstance(a, shoal.SharedArray) and a.flags.f_contiguous and a.dtype == np.float32
    assert np.array_equal(a, src)
    a[0, 0] = 99
    assert src[0, 0] == 0  # a copy
    assert shoal.SharedArray.from_array(a) is a
    assert np.array_equal(shoal.SharedArray.from_array(src[::2, ::-1]), src[::2, ::-1])
    assert np.array_equal(shoal.SharedArray.from_array([[1, 2], [3, 4]]), [[1, 2], [3, 4]])


def test_share_is_a_deprecated_alias_of_from_array():
    # share() differed from shoal.shared() by one letter and meant something
    # unrelated; it stays one release, warning.
    src = np.arange(4)
    with pytest.warns(DeprecationWarning, match=r"SharedArray\.from_array"):
        a = shoal.share(src)
    assert isinstance(a, shoal.SharedArray) and np.array_equal(a, src)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (((-1, 3),), {}, ValueError, "must not be negative"),
        ((-5,), {}, ValueError, "must not be negative"),
        ((2.5,), {}, TypeError, "int or a sequence of ints"),
        (("abc",), {}, TypeError, "int or a sequence of ints"),
        ((3,), {"dtype": object}, TypeError, "cannot hold dtype"),
        ((3,), {"dtype": [("a", "i4"), ("b", "O")]}, TypeError, "cannot hold dtype"),
        ((3,), {"order": "K"}, ValueError, "order must be 'C' or 'F'"),
        ((3,), {"dtype": "no such dtype"}, TypeError, "not understood"),
    ],
)
def test_bad_input_is_a_clear_error(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        shoal.SharedArray(*args, **kwargs)


def test_from_array_refuses_object_arrays():
    with pytest.raises(TypeError, match="cannot hold dtype"):
        shoal.SharedArray.from_array(np.array([None, 1], dtype=object))


def test_memory_lives_while_a_view_does():
    a = shoal.SharedArray(1000)
    a[:] = 7
    view = a[10:20]
    del a
    assert view.sum() == 70 and _memfd_fds()
    del view
    assert not _memfd_fds() and not workers.shoal_mappings()


def test_import_shoal_does_not_import_numpy_and_shared_array_says_it_needs_it():
    code = textwrap.dedent(
        """
        import sys
        import shoal
        assert "numpy" not in sys.modules, "import shoal imported numpy"
        sys.modules["numpy"] = None  # as if numpy were not installed
        try:
            shoal.SharedArray(3)
        except ModuleNotFoundError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "needs numpy" in out.stdout and "pip install" in out.stdout


# -- handed to other processes ---------------------------------------------------


def test_pool_worker_writes_are_visible_in_the_parent(start_method):
    a = shoal.SharedArray((4, BIG // 4))
    with shoal.Pool(2, context=start_method) as pool:
        pids = pool.starmap(workers.fill, [(a[i], i + 1) for i in range(4)], chunksize=1)
        assert os.getpid() not in pids
        assert [float(row[0]) for row in a] == [1.0, 2.0, 3.0, 4.0]
        # A non-contiguous view reaches the same memory too.
        pool.apply(workers.fill, (a[:, ::7], -1.0))
        assert (a[:, ::7] == -1.0).all() and (a[:, 1] != -1.0).all()
    del a, pids


def test_process_pipe_and_queue_receivers_share_the_memory(start_method):
    ctx = shoal.get_context(start_method)
    a = shoal.SharedArray(BIG, dtype=np.int32)
    reader, writer = shoal.Pipe()
    with reader, writer:
        p = ctx.Process(target=workers.fill_and_send, args=(writer, a[5:], 3))
        p.start()
        assert reader.recv() == "filled"
        p.join()
        assert a[:5].sum() == 0 and (a[5:] == 3).all()
        # Through a Pipe and a Queue: the received array is the same memory.
        writer.send(a[::2])
        got = reader.recv()
        got[0] = 11
        assert a[0] == 11
        q = shoal.Queue()
        q.put(a)
        got2 = q.get(timeout=30)
        got2[1] = 12
        assert a[1] == 12
        q.close()
        q.join_thread()
    del a, got, got2


LAYOUTS = {
    "contiguous": lambda: np.arange(BIG, dtype=np.float64),
    "non-contiguous": lambda: np.arange(4 * BIG, dtype=np.float64)[::4],
    "reversed 2-d view": lambda: np.arange(BIG, dtype=np.int64).reshape(500, -1)[::-1, 3:],
    "fortran": lambda: np.asfortranarray(np.arange(BIG, dtype=np.float32).reshape(600, -1)),
    "structured": lambda: np.array(
        [(i, float(i) / 3, b"ab") for i in range(BIG // 10)], dtype=[("i", "<i4"), ("f", "<f8"), ("s", "S2")]
    ),
    "0-d": lambda: np.array(3.5),
    "empty": lambda: np.zeros((0, 7), dtype=np.int16),
    "bool": lambda: np.arange(BIG) % 3 == 0,
    "complex big-endian": lambda: np.arange(BIG // 2, dtype=">c16"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_arrives_intact_both_ways(fork_or_spawn, layout):
    src = LAYOUTS[layout]()
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        kind, writable, dtype, shape, data = pool.apply(workers.describe_array, (src,))
        assert (kind, dtype, shape, data) == ("ndarray", src.dtype.str, src.shape, src.tobytes())
        # Large plain arrays arrive read-only (the worker cannot write into
        # memory the caller thinks private); small ones are ordinary copies.
        if src.nbytes >= 256 * 1024 and (src.flags.c_contiguous or src.flags.f_contiguous):
            assert writable is False
        back = pool.apply(workers.identity, (src,))
        assert back.dtype == src.dtype and back.shape == src.shape and np.array_equal(back, src)
        shared = shoal.SharedArray.from_array(src)
        kind, writable, dtype, shape, data = pool.apply(workers.describe_array, (shared,))
        assert (kind, writable, dtype, shape, data) == (
            "SharedArray",
            True,
            src.dtype.str,
            src.shape,
            src.tobytes(),
        )
        if shared.ndim:
            view = shared[::-1] if shared.ndim == 1 else shared[::2, ::-1]
            assert pool.apply(workers.describe_array, (view,))[4] == view.tobytes()
    del back, shared


def test_large_results_are_writable_private_copies(fork_or_spawn):
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        first = pool.apply(workers.full_array, (BIG, 1.0))
        first[0] = 5.0  # a private copy-on-write mapping: writable, and ours alone
        second = pool.apply(workers.full_array, (BIG, 2.0))
        assert first[0] == 5.0 and (first[1:] == 1.0).all() and (second == 2.0).all()
        del first, second


def test_large_bytes_bytearray_and_memoryview_arguments_and_results(fork_or_spawn):
    payload = os.urandom(1 << 20)
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        for obj, kind in (
            (payload, "bytes"),
            (bytearray(payload), "bytearray"),
            (memoryview(payload), "memoryview"),
        ):
            assert pool.apply(workers.bytes_like_info, (obj,)) == (
                kind,
                len(payload),
                payload[:4],
                payload[-4:],
            )
            assert pool.map(workers.bytes_like_info, [obj])[0][0] == kind
        back = pool.apply(workers.identity, ({"data": [payload]},))
        assert back == {"data": [payload]}
        view = pool.apply(workers.identity, (memoryview(np.arange(BIG, dtype=np.int32)),))
        assert view.format == "i" and view.tolist() == list(range(BIG))
        del view


def test_warm_segments_are_reused_and_returned(fork_or_spawn):
    arrays = [np.full(BIG, float(i)) for i in range(6)]
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        for _ in range(5):
            assert pool.map(workers.array_sum, arrays, chunksize=1) == [BIG * float(i) for i in range(6)]
            results = [pool.apply(workers.full_array, (BIG, 1.0)) for _ in range(3)]
            del results
        # The pool keeps a bounded number of warm segments, not one per task.
        assert len(_memfd_fds()) <= 12
        # Results received and dropped are unmapped here (what stays mapped
        # is the pool's own warm segments, shared "s" mappings).
        received = [m for m in workers.shoal_mappings() if m.split()[1].endswith("p")]
        assert received == []
    assert _memfd_fds() == [] and workers.shoal_mappings() == []


def test_an_array_written_in_place_between_sends_reaches_the_workers_as_written(fork_or_spawn):
    # Each send is a snapshot of the array's bytes at that moment, as with
    # the standard library.  joblib's memmapping cache keys arrays by
    # identity, so after `a[0] = 42.0` the same Parallel hands its workers
    # the old bytes; a cache of that kind here would fail this test.
    arrays = [np.full(BIG, float(i)) for i in range(4)]
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        for step in range(3):
            expected = [float(a.sum()) for a in arrays]
            assert pool.map(workers.array_sum, arrays, chunksize=1) == expected
            assert [pool.apply(workers.array_sum, (a,)) for a in arrays] == expected
            for a in arrays:
                a[-1] += 1.0  # the last element only: a comparison must read it all
            arrays[step][0] = -1.0
        assert pool.map(workers.array_sum, arrays, chunksize=1) == [float(a.sum()) for a in arrays]


# -- snapshots: an array sent again unchanged is not copied again ---------------


def _snapshots_work() -> bool:
    from shoal._fd._snapshots import ENABLED

    a = np.ones(1 << 18)  # 2 MiB
    start = -(-a.ctypes.data // 4096) * 4096
    try:
        return ENABLED and _native.track_writes(start, 4096)
    finally:
        _native.stop_tracking()


snapshots = pytest.mark.skipif(
    not _snapshots_work(),
    reason="this kernel cannot track writes (userfaultfd WP_ASYNC, PAGEMAP_SCAN: Linux 6.9 or 6.8.10)",
)


@snapshots
def test_an_unchanged_array_sent_again_arrives_in_the_same_shared_memory(fork_or_spawn):
    # The worker keeps each array it gets, so the memory it arrived in is
    # still read: a new copy could not go there, and would show as new
    # shared memory.  The first send copies as usual (an array sent once
    # keeps the reusable memory free); the second makes the copy that later
    # sends reuse.
    a = np.full(BIG, 2.0)
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        got = [pool.apply(workers.stash_and_segment, (a,)) for _ in range(4)]
        assert [s for s, _ in got] == [BIG * 2.0] * 4
        inodes = {inode for _, inode in got[1:]}
        assert len(inodes) == 1 and None not in inodes  # one copy, sent three times
        assert got[0][1] not in inodes
        a[BIG // 2] = 5.0  # a page in the middle
        total, inode = pool.apply(workers.stash_and_segment, (a,))
        assert total == BIG * 2.0 + 3.0 and inode not in inodes


def test_arrays_sent_once_each_reuse_the_same_shared_memory(fork_or_spawn):
    # A stream of new arrays must not pin shared memory per array: each is
    # copied into memory the previous one arrived in, once it is free.
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        inodes = {pool.apply(workers.array_sum_and_segment, (np.full(BIG, float(i)),))[1] for i in range(6)}
    assert len(inodes) <= 2, inodes


def _write_first(a):
    a[0] = 7.0  # the partial page at the start (shared with malloc's header)


def _write_middle(a):
    a[len(a) // 2] = 7.0


def _write_last(a):
    a[-1] = 7.0  # the partial page at the end


def _write_through_a_view(a):
    a[1000:][5] = 7.0


def _write_by_the_kernel(a):
    r, w = os.pipe()
    os.write(w, np.float64(7.0).tobytes())
    os.readv(r, [memoryview(a).cast("B")[8 * 2000 : 8 * 2001]])  # read(2) into the array
    os.close(r)
    os.close(w)


def _write_from_a_thread(a):
    t = threading.Thread(target=a.__setitem__, args=(3000, 7.0))
    t.start()
    t.join()


def _write_all(a):
    np.copyto(a, np.arange(len(a), dtype=a.dtype))


WRITES = [_write_first, _write_middle, _write_last, _write_through_a_view, _write_by_the_kernel]
WRITES += [_write_from_a_thread, _write_all]


@pytest.mark.parametrize("write", WRITES, ids=[w.__name__[1:] for w in WRITES])
def test_a_write_between_sends_always_arrives(write, fork_or_spawn):
    # An array sent before is not copied again while the kernel reports no
    # write to it: every way of writing must be reported (or the array is
    # not tracked), or workers would compute on old bytes.
    a = np.full(BIG, 1.0)
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        for _ in range(3):  # copied, copied into its snapshot, sent as the snapshot
            assert pool.apply(workers.array_sum, (a,)) == float(a.sum())
        write(a)
        expected = float(a.sum())
        assert pool.apply(workers.array_sum, (a,)) == expected
        assert pool.map(workers.array_sum, [a, a[10:], a], chunksize=1) == [
            expected,
            float(a[10:].sum()),
            expected,
        ]
        write(a)  # the array changes: copied on every send from now on
        a[1] += 1.0
        assert pool.apply(workers.array_sum, (a,)) == float(a.sum())


def test_writes_in_a_forked_child_do_not_count_and_the_parents_do(fork_or_spawn):
    a = np.full(BIG, 1.0)
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        assert pool.apply(workers.array_sum, (a,)) == BIG
        assert pool.apply(workers.array_sum, (a,)) == BIG
        pid = os.fork()
        if pid == 0:
            a[:] = 9.0  # the child's own copy of the pages
            os._exit(0)
        os.waitpid(pid, 0)
        assert pool.apply(workers.array_sum, (a,)) == BIG
        a[BIG // 2] = 3.0
        assert pool.apply(workers.array_sum, (a,)) == BIG + 2.0


@snapshots
def test_a_child_forked_while_a_thread_tracks_an_array_can_track_its_own():
    # The pool forks replacement workers from its scheduler thread, maybe
    # while another thread holds the tracking registry's lock: the child
    # inherited it locked, and its first tracked array hung.
    from shoal._fd import _snapshots

    with _snapshots._registry.lock:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang ends the child
            signal.alarm(20)
            a = np.ones(BIG)
            snap = _snapshots.Snapshot.track(a, a.ctypes.data, a.nbytes, [])
            os._exit(0 if snap is not None else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_array_freed_and_another_at_its_address_sends_the_new_bytes(fork_or_spawn):
    # Snapshots know an array by the object, its address and length; a new
    # array that malloc puts where a freed one was is a new array.
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        addresses = set()
        for value in (1.0, 2.0, 3.0, 4.0):
            a = np.full(BIG, value)
            addresses.add(a.ctypes.data)
            for _ in range(3):
                assert pool.apply(workers.array_sum, (a,)) == BIG * value
            del a
        assert len(addresses) < 4  # the case happened: an address was reused


def test_an_array_in_a_file_mapping_written_by_another_process_arrives_as_written(tmp_path, fork_or_spawn):
    # Memory another process can write is never a snapshot (it writes
    # without faulting here): a file mapping, written through the file.
    path = tmp_path / "data.f8"
    np.full(BIG, 1.0).tofile(path)
    m = np.memmap(path, dtype=np.float64, mode="r+")
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        for _ in range(3):
            assert pool.apply(workers.array_sum, (m,)) == BIG
        with open(path, "r+b") as f:
            f.seek(8 * 1000)
            f.write(np.float64(5.0).tobytes())
        assert pool.apply(workers.array_sum, (m,)) == BIG + 4.0
    del m


def test_an_argument_a_worker_keeps_is_never_overwritten(fork_or_spawn):
    # The pool reuses the shared memory of finished tasks' arguments: memory
    # a worker still maps (it kept the array) must not be reused.
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        assert pool.apply(workers.stash, (np.full(BIG, 1.0),)) == 1
        for value in (2.0, 3.0, 4.0):
            assert pool.apply(workers.array_sum, (np.full(BIG, value),)) == BIG * value
        assert pool.apply(workers.stash, (np.full(BIG, 5.0),)) == 2
        assert pool.apply(workers.array_sum, (np.full(BIG, 6.0),)) == BIG * 6.0
        assert pool.apply(workers.stashed_sums) == [BIG * 1.0, BIG * 5.0]


# -- crashes ---------------------------------------------------------------------


def test_a_worker_killed_with_arrays_in_flight_leaves_nothing(fork_or_spawn):
    shared = shoal.SharedArray(BIG)
    plain = np.ones(BIG)
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        doomed = [pool.apply_async(workers.kill_self_holding, (x,)) for x in (shared, plain)]
        queued = [pool.apply_async(workers.array_sum, (x,)) for x in (shared, plain)]
        for r in doomed:
            with pytest.raises(shoal.WorkerDiedError):
                r.get(timeout=60)
        assert [r.get(timeout=60) for r in queued] == [0.0, float(BIG)]
    del shared
    assert _memfd_fds() == [] and workers.shoal_mappings() == []


def _grandchildren(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_the_parent_killed_with_arrays_in_flight_leaves_nothing(fork_or_spawn):
    code = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        import shoal
        import workers

        if __name__ == "__main__":
            pool = shoal.Pool(2, context=sys.argv[1])
            shared = shoal.SharedArray(300_000)
            plain = np.ones(300_000)
            held = [pool.apply_async(workers.sleep_then, (x, 3)) for x in (shared, plain, shared[::3])]
            back = pool.apply(workers.full_array, (300_000, 1.0))
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, fork_or_spawn], cwd=here, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        family = _grandchildren(proc.pid)
        workers_mapping = [p for p in family if _maps_shoal_memory(p)]
        assert workers_mapping, "the workers should hold the arrays in flight"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"processes left after the parent was killed: {alive}"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _maps_shoal_memory(p: psutil.Process) -> bool:
    try:
        with open(f"/proc/{p.pid}/maps") as f:
            return any("memfd:shoal " in line or "memfd:shoal-buffers" in line for line in f)
    except OSError:
        return False


def test_from_array_copies_datetime_and_timedelta_arrays():
    # from_array() (then share()) went through memoryview(), which refuses datetime64/timedelta64: ValueError.
    for src in (np.arange(5).astype("M8[ns]"), np.arange(6).astype("m8[s]").reshape(2, 3).T):
        a = shoal.SharedArray.from_array(src)
        assert isinstance(a, shoal.SharedArray) and a.dtype == src.dtype and np.array_equal(a, src)


def test_a_shared_array_in_initargs_reaches_every_worker(start_method):
    # initargs were pickled once, outside a shoal channel: the descriptor went
    # through a one-shot resource sharer and the second worker failed to start.
    a = shoal.SharedArray(4)
    with shoal.Pool(2, initializer=workers.stash, initargs=(a,), context=start_method) as pool:
        assert sorted(pool.starmap(workers.fill_stashed, [(i, i + 1.0) for i in range(4)], chunksize=1)) == [
            0,
            1,
            2,
            3,
        ]
    assert a.tolist() == [1.0, 2.0, 3.0, 4.0]
    del a


def test_plain_pickle_of_a_shared_array_is_a_clear_error(tmp_path):
    # pickle.dump() to a file "worked": it started multiprocessing's resource
    # sharer, and loading the file later failed with an unrelated EOFError.
    import pickle

    a = shoal.SharedArray(3)
    with open(tmp_path / "a.pickle", "wb") as f, pytest.raises(TypeError, match="pickle a plain copy"):
        pickle.dump(a, f)
    with pytest.raises(TypeError, match="cannot pickle a shoal.SharedArray"):
        pickle.dumps({"inside": [a[1:]]})
    # A SharedDict stores values pickled: it said nothing, and the second read raised EOFError.
    d = shoal.SharedDict()
    with pytest.raises(shoal.exceptions.SerializationError, match="cannot pickle a shoal.SharedArray"):
        d["a"] = a
    assert "a" not in d
    d.close()
    # Private copies and arrays derived from it pickle as numpy arrays.
    assert np.array_equal(pickle.loads(pickle.dumps(np.array(a))), a)
    assert type(pickle.loads(pickle.dumps(a + 1))) is np.ndarray
    del a


def test_many_large_results_kept_alive_do_not_run_out_of_descriptors():
    # Each received result's mapping kept a descriptor (mmap.mmap holds a
    # dup): a few hundred kept results failed with OSError EMFILE (Too many
    # open files).  Then mapping stopped when the *received* descriptor's
    # number came near RLIMIT_NOFILE, but that number stays low (each one is
    # closed after mapping, and the next takes the same number) while the
    # mappings' duplicates climbed to the limit: a batch's descriptors could
    # then not be received at all ("a frame came with 5 descriptors but only
    # 4 could be received", CI under 3.13).  Now a mapping keeps none.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Every free number below the highest open one taken, and 150 above it:
    # RLIMIT_NOFILE bounds numbers, not how many are open, and the holes
    # earlier tests leave would otherwise hide a leak of a few hundred.
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    holes = [os.dup(0) for _ in range(top + 1 - len(os.listdir("/proc/self/fd")))]
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(top, *holes, 0) + 1 + 150, hard))
    try:
        with shoal.Pool(1) as pool:
            pool.apply(workers.full_array, (40_000, -1.0))  # the pool's own descriptors are open
            before = len(os.listdir("/proc/self/fd"))
            kept = [pool.apply_async(workers.full_array, (40_000, float(i))) for i in range(300)]
            kept = [r.get(timeout=60) for r in kept]
            assert len(os.listdir("/proc/self/fd")) - before < 10
            assert [float(a[0]) for a in kept] == [float(i) for i in range(300)]
            # Mapped or copied, each is a writable array of its own, as in-band results are.
            assert all(a.shape == (40_000,) and a.flags.writeable for a in kept)
            kept[0][:] = 7.0
            assert float(kept[1][0]) == 1.0
            del kept
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in holes:
            os.close(fd)


@contextlib.contextmanager
def _every_descriptor_number_taken():
    """Inside: RLIMIT_NOFILE a little above the descriptors open now, and
    every number under it taken (the limit bounds numbers, not a count)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(n) for n in os.listdir("/proc/self/fd"))
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + 200, hard))
    try:
        while True:
            try:
                filler.append(os.dup(0))
            except OSError:
                break
        yield
    finally:
        for n in filler:
            os.close(n)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("leased", [False, True], ids=["private", "leased"])
@pytest.mark.parametrize("writable", [True, False], ids=["writable", "read-only"])
def test_buffers_received_when_no_descriptor_is_free_still_arrive(leased, writable):
    # One message brings many descriptors (a batch of results, one each), so
    # a received descriptor can have a low number while every number up to
    # RLIMIT_NOFILE is taken: mapping it (mmap keeps a duplicate) failed with
    # "out-of-band buffers ... could not be mapped ([Errno 24] Too many open
    # files)", a result lost in a combined run on CI.  Now a private mapping
    # needs no descriptor, and a leased one, whose lease needs one for a
    # moment, is copied.

    from shoal._serialization import _pickling

    data = bytes(range(256)) * 1024
    fd = os.memfd_create("test-oob")
    os.write(fd, data)
    with _every_descriptor_number_taken():
        spans = [(4096, 100), (0, len(data))]
        views = _pickling._rebuild_oob(lambda n: n, (fd,), len(data), spans, leased, writable)
    assert [bytes(v) for v in views] == [data[4096:4196], data]
    assert all(v.readonly is not writable for v in views)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, mapped or copied


def test_a_batch_whose_descriptors_fill_every_number_is_still_unpickled():
    # A batch of results brings one descriptor per large result; when they
    # took every number up to RLIMIT_NOFILE, each result's dup of its own
    # failed: "the task's result could not be unpickled in the parent:
    # OSError: [Errno 24] Too many open files" (CI, a combined run).

    from shoal._fd import sending_fds
    from shoal._serialization import dumps, loads_with

    arrays = [np.full(40_000, float(i)) for i in range(6)]
    messages = []
    fds: list[int] = []
    for a in arrays:
        mine: list[int] = []
        with sending_fds(mine):
            messages.append((dumps(a, oob=True, what="a result"), len(mine)))
        fds += mine
    with _every_descriptor_number_taken():
        got = []
        pos = 0
        for data, n in messages:
            got.append(loads_with(data, fds, pos, pos + n))
            pos += n
    # The first result, finding no free number, took its descriptor and
    # left -1; the receiver closes the others (the teardown checks that
    # none is left open).
    for fd in fds:
        if fd >= 0:
            os.close(fd)
    assert fds[0] == -1
    assert [float(a[0]) for a in got] == [float(i) for i in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays, strict=True))
