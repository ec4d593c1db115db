"""Who may reach a shoal endpoint (``docs/security.md``): each boundary tried
from the wrong side.

Switching users needs root: these tests run as root (as CI does) and are
skipped otherwise.  A process of another uid is a child that calls
``os.setgid``/``os.setuid`` before it tries anything.
"""

from __future__ import annotations

import os
import pickle
import socket

import pytest

import shoal

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")

#: Two unprivileged users (``nobody`` and the uid below it); neither owns any file here.
OTHER_UID = 65534
THIRD_UID = 65533


class Evaluator:
    """An actor whose method runs whatever it is given: what an intruder wants."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self, source: str):
        self.runs += 1
        return eval(source)

    def count(self) -> int:
        return self.runs


def _become(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _call_as(uid: int, handle, conn) -> None:
    """A child's target: switch to *uid*, then call the actor through its handle."""
    _become(uid)
    try:
        value = handle.run("__import__('os').geteuid()")
    except BaseException as exc:
        conn.send((type(exc).__name__, str(exc)))
    else:
        conn.send(("ran", value))


def _actor_addresses(pid: int) -> list[str]:
    """What any local user can read: the abstract socket addresses of the
    actors that process *pid* created, listed in /proc/net/unix."""
    with open("/proc/net/unix") as f:
        return [line.split()[-1] for line in f if f"@shoal-actor-{pid}-" in line]


def _raw_call_as(uid: int, address: str, conn) -> None:
    """A child's target: switch to *uid* and speak shoal's wire protocol to
    the address by hand (an intruder does not run shoal's own checks)."""
    from shoal._actor import CALL
    from shoal._ipc import recv_packet, send_packet

    _become(uid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect("\0" + address.lstrip("@"))
        blob = pickle.dumps((("__import__('os').geteuid()",), None))
        try:
            send_packet(sock, 0, pickle.dumps((CALL, 1, "run", blob)))
        except OSError:
            pass  # closed on us already
        sock.settimeout(30)
        replies = []
        while True:
            packet = recv_packet(sock)
            if packet is None:
                break
            kind, payload, _fds = packet
            replies.append((kind, bytes(payload)))
        conn.send(("replies", replies))
    except BaseException as exc:
        conn.send((type(exc).__name__, str(exc)))
    finally:
        sock.close()


def _run_child(ctx, target, *args) -> tuple[str, object]:
    """Run *target* in a child of *ctx* with a pipe end as its last argument; what it sent."""
    reader, writer = shoal.Pipe(duplex=False)
    with reader, writer:
        child = ctx.Process(target=target, args=(*args, writer))
        child.start()
        try:
            assert reader.poll(60), "the child reported nothing within 60 s"
            return reader.recv()
        finally:
            child.join(30)
            if child.exitcode is None:
                child.kill()
                child.join()


@needs_root
def test_actor_run_by_root_refuses_another_users_handle(fork_or_spawn):
    # Before: an actor run by root accepted every uid, so any local user who
    # found its address ran code as root.
    ctx = shoal.get_context(fork_or_spawn)
    with ctx.Actor(Evaluator) as actor:
        what, detail = _run_child(ctx, _call_as, OTHER_UID, actor)
        assert what == "PermissionError", (what, detail)
        assert "uid 0" in detail and f"uid {OTHER_UID}" in detail and "same user" not in detail
        assert "serves only processes of its own user" in detail
        assert actor.count() == 0  # nothing ran
        assert actor.run("1 + 1") == 2  # and the actor still serves its own user


@needs_root
def test_actor_run_by_root_refuses_a_raw_connection_and_says_why(fork_or_spawn):
    ctx = shoal.get_context(fork_or_spawn)
    with ctx.Actor(Evaluator) as actor:
        addresses = _actor_addresses(os.getpid())
        assert addresses, "the address is listed for every user to read"
        what, replies = _run_child(ctx, _raw_call_as, OTHER_UID, addresses[0])
        assert what == "replies", (what, replies)
        assert len(replies) == 1  # one refusal, in plain text, then the end of the stream
        text = replies[0][1].decode()
        assert f"uid {OTHER_UID}" in text and "runs as uid 0" in text
        assert actor.count() == 0


def _create_as(uid: int, conn) -> None:
    """A child's target: as *uid*, create an actor, hand its handle out,
    wait to be told to close it; report how many calls it ran."""
    _become(uid)
    with shoal.get_context("fork").Actor(Evaluator) as actor:
        conn.send(actor)
        conn.recv()  # the test is done trying
        conn.send(actor.count())


@needs_root
def test_actor_of_an_unprivileged_user_refuses_other_users_and_root(fork_or_spawn):
    # The actor's creator is forked: a process of uid 65534 cannot execute
    # the interpreter here (it lives under /root, mode 700), so it cannot spawn.
    creator_side, test_side = shoal.Pipe()
    creator = shoal.get_context("fork").Process(target=_create_as, args=(OTHER_UID, creator_side))
    creator.start()
    try:
        assert test_side.poll(60)
        actor = test_side.recv()
        # Another unprivileged user, through the handle and by hand:
        ctx = shoal.get_context(fork_or_spawn)
        what, detail = _run_child(ctx, _call_as, THIRD_UID, actor)
        assert what == "PermissionError", (what, detail)
        assert f"runs as uid {OTHER_UID}" in detail
        what, replies = _run_child(ctx, _raw_call_as, THIRD_UID, _actor_addresses(creator.pid)[0])
        assert what == "replies" and len(replies) == 1 and f"uid {THIRD_UID}" in replies[0][1].decode()
        # Root: refused too (its replies would be pickles written by another user).
        with pytest.raises(PermissionError, match=f"runs as uid {OTHER_UID} and this process as uid 0"):
            actor.run("1")
        what, replies = _run_child(ctx, _raw_call_as, 0, _actor_addresses(creator.pid)[0])
        assert what == "replies" and len(replies) == 1 and "as uid 0" in replies[0][1].decode()
        test_side.send("done")
        assert test_side.poll(60)
        assert test_side.recv() == 0  # none of those calls ran
    finally:
        creator.join(30)
        if creator.exitcode is None:
            creator.kill()
            creator.join()
        creator_side.close()
        test_side.close()
    assert creator.exitcode == 0


# -- descriptors: sockets, pipes, memfd segments ------------------------------------


def _try_descriptors_as(uid: int, pids: list[int], conn) -> None:
    """A child's target: as *uid*, try to reach every descriptor (and the
    memory) of the processes *pids* through /proc; report what worked."""
    _become(uid)
    reached = []
    for pid in pids:
        for path in (f"/proc/{pid}/fd", f"/proc/{pid}/mem", f"/proc/{pid}/map_files"):
            try:
                os.listdir(path) if not path.endswith("mem") else os.close(os.open(path, os.O_RDONLY))
                reached.append(path)
            except PermissionError:
                pass
            except FileNotFoundError:
                pass
        for fd in range(3, 64):
            try:
                os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY))
                reached.append(f"/proc/{pid}/fd/{fd}")
            except (PermissionError, FileNotFoundError):
                pass
            except OSError as exc:  # ENXIO (a socket): the kernel let the path through
                reached.append(f"/proc/{pid}/fd/{fd} ({exc.strerror})")
    conn.send(("reached", reached))


@needs_root
def test_another_user_reaches_no_descriptor_or_memory_of_shoal_processes(fork_or_spawn):
    # Every shared object is a descriptor (socket pair, memfd): the only way
    # in from outside is /proc/<pid>/fd, which the kernel opens only to the
    # same user (ptrace access rules).
    np = pytest.importorskip("numpy")
    ctx = shoal.get_context(fork_or_spawn)
    a, b = shoal.Pipe()
    q = shoal.Queue()
    d = shoal.SharedDict()
    arr = shoal.SharedArray((1000,), np.float64)
    try:
        d["secret"] = "x"
        q.put("secret")
        with ctx.Pool(2) as pool, ctx.Actor(Evaluator) as actor:
            pids = [os.getpid(), actor.pid, *(p.pid for p in pool._pool)]
            what, reached = _run_child(ctx, _try_descriptors_as, OTHER_UID, pids)
            assert what == "reached" and reached == [], reached
            # The same from the same user: the kernel lets it through (the test can fail).
            what, reached_by_owner = _run_child(ctx, _try_descriptors_as, 0, pids)
            assert reached_by_owner
    finally:
        for obj in (a, b, q, d):
            obj.close()
        del arr


# -- the Manager ------------------------------------------------------------------------


def _connect_as(uid: int, address, authkey: bytes, conn) -> None:
    from multiprocessing.connection import Client

    if uid != os.geteuid():
        _become(uid)
    try:
        Client(address, authkey=authkey).close()
    except BaseException as exc:
        conn.send((type(exc).__name__, str(exc)))
    else:
        conn.send(("connected", None))


@needs_root
def test_a_managers_server_refuses_another_user_and_a_wrong_authkey():
    ctx = shoal.get_context("fork")
    with shoal.Manager() as manager:
        queue = manager.Queue()  # starts the server
        address = manager._sync().address
        assert isinstance(address, str) and os.path.exists(address)  # an AF_UNIX path
        what, detail = _run_child(
            ctx, _connect_as, OTHER_UID, address, bytes(shoal.current_process().authkey)
        )
        assert what == "PermissionError", (what, detail)  # its directory is the owner's alone
        what, detail = _run_child(ctx, _connect_as, 0, address, b"not the authkey")
        assert what == "AuthenticationError", (what, detail)
        what, detail = _run_child(ctx, _connect_as, 0, address, bytes(shoal.current_process().authkey))
        assert what == "connected", (what, detail)
        queue.put(1)


# -- the Dask cluster ---------------------------------------------------------------------


def test_a_tls_dask_scheduler_needs_credentials_and_works_with_them():
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("cryptography")
    import dask

    security = distributed.Security.temporary()
    with distributed.LocalCluster(
        n_workers=1,
        processes=False,
        security=security,
        protocol="tls://",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        with pytest.raises(ConnectionError, match="speaks TLS and this process has no TLS credentials"):
            shoal.Pool(backend="dask", address=cluster.scheduler_address)
        credentials = {
            "distributed.comm.tls.ca-file": security.tls_ca_file,
            "distributed.comm.tls.client.cert": security.tls_client_cert,
            "distributed.comm.tls.client.key": security.tls_client_key,
        }
        with dask.config.set(credentials):
            with shoal.Pool(backend="dask", address=cluster.scheduler_address) as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]


# -- shoal map ------------------------------------------------------------------------------


@needs_root
def test_shoal_map_refuses_a_module_another_user_put_in_the_current_directory(tmp_path):
    from helpers import run_python

    planted = tmp_path / "tasks.py"
    planted.write_text("import os\ndef double(x):\n    return 2 * int(x)\nos.system('touch pwned')\n")
    os.chown(planted, OTHER_UID, OTHER_UID)
    out = run_python("-m", "shoal", "map", "tasks:double", cwd=tmp_path, input="1\n")
    assert out.returncode == 2, out
    assert "refusing to import" in out.stderr and f"uid {OTHER_UID}" in out.stderr
    assert not (tmp_path / "pwned").exists()
    os.chown(planted, 0, 0)  # the user's own module: imported
    mine = run_python("-m", "shoal", "map", "tasks:double", cwd=tmp_path, input="1\n")
    assert mine.returncode == 0 and mine.stdout == "2\n", mine
