import multiprocessing
import os
import pickle
import subprocess
import threading
import time
import uuid

import pytest

import palisade
from conftest import find, run_threads, wait_until


@pytest.fixture(params=["file", "etcd"])
def coordinator(request, tmp_path):
    if request.param == "file":
        return palisade.Coordinator.file(str(tmp_path / "locks"))
    etcd = request.getfixturevalue("etcd")
    # A namespace per test: its own keys, and its own connection (and session lease).
    return palisade.Coordinator.etcd(etcd, ttl=3, namespace=f"py-{uuid.uuid4().hex}/")


def test_lock_context_manager_gives_increasing_fencing_tokens(coordinator):
    tokens = []
    for _ in range(3):
        with coordinator.lock("daily") as guard:
            assert guard.name == "daily" and not guard.lost
            tokens.append(guard.fencing_token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_a_held_lock_is_refused_at_once_or_after_the_timeout(coordinator):
    with coordinator.lock("busy"):
        with pytest.raises(palisade.LockHeld):
            with coordinator.lock("busy", timeout=0):
                pass
        started = time.monotonic()
        with pytest.raises(palisade.LockTimeout):
            with coordinator.lock("busy", timeout=0.3):
                pass
        assert time.monotonic() - started >= 0.3
    with coordinator.lock("busy", timeout=0):
        pass  # released by the with block


def test_guard_release_lets_another_holder_in_at_once(coordinator):
    outer = coordinator.lock("released")
    guard = outer.__enter__()
    try:
        guard.release()
        guard.release()  # a second release does nothing
        other = coordinator.lock("released", timeout=0)  # LockHeld if the release did not free it
        taken = other.__enter__()
        assert taken.fencing_token > guard.fencing_token
    finally:
        outer.__exit__(None, None, None)  # after release(): must not free the other holder's lock
    try:
        with pytest.raises(palisade.LockHeld):
            with coordinator.lock("released", timeout=0):
                pytest.fail("the first block's end released the second holder's lock")
    finally:
        other.__exit__(None, None, None)
    with coordinator.semaphore("released-slots", 1, timeout=10) as slot:
        slot.release()
        with coordinator.semaphore("released-slots", 1, timeout=0) as again:
            assert again.fencing_token > slot.fencing_token


def test_run_exclusive_runs_or_skips_naming_the_holder(coordinator):
    def job(a, b=0):
        ctx = palisade.current_job()
        assert ctx.name == "etl" and not ctx.lost
        ctx.check()
        inner = coordinator.run_exclusive("etl", lambda: "nested")
        assert isinstance(inner, palisade.Skipped) and not inner.ran
        assert inner.holder["name"] == "etl" and inner.holder["pid"] == os.getpid()
        assert inner.holder["fencing_token"] == ctx.fencing_token
        running = coordinator.running_jobs()
        assert [j["lock"] for j in running] == ["etl"]
        return (a + b, ctx.fencing_token)

    ran = coordinator.run_exclusive("etl", job, 1, b=2)
    assert isinstance(ran, palisade.Ran) and ran.ran
    assert ran.value == (3, ran.fencing_token)
    assert palisade.current_job() is None
    assert coordinator.running_jobs() == []


def test_run_exclusive_reraises_and_releases(coordinator):
    with pytest.raises(ZeroDivisionError):
        coordinator.run_exclusive("fails", lambda: 1 / 0)
    assert coordinator.run_exclusive("fails", lambda: "again").value == "again"


def test_run_exclusive_waits_when_asked(coordinator):
    guard_ctx = coordinator.lock("queued")
    guard_ctx.__enter__()
    releasing, errors = threading.Event(), []

    def release():
        releasing.set()  # set before the release: a job that runs after it sees it set
        try:
            guard_ctx.__exit__(None, None, None)
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            errors.append(repr(e))

    releaser = threading.Timer(0.3, release)
    started = time.monotonic()
    releaser.start()
    try:
        ran = coordinator.run_exclusive("queued", releasing.is_set, wait=20)
    finally:
        releaser.join(30)
    assert errors == [], f"releasing the first holder failed: {errors}"
    assert ran.ran and ran.value is True, "the job ran before the holder released the lock"
    assert time.monotonic() - started >= 0.3, "run_exclusive did not wait for the release"


def test_sixteen_threads_exclude_each_other(coordinator):
    inside, peak, done = [0], [0], []
    lock = threading.Lock()

    def work():
        for _ in range(3):
            def critical():
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0.002)  # hold the lock while others wait on it, GIL released
                with lock:
                    inside[0] -= 1
                return palisade.current_job().fencing_token

            done.append(coordinator.run_exclusive("shared", critical, wait="forever").value)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread is stuck waiting for the lock"
    assert peak[0] == 1
    assert len(done) == 48 and len(set(done)) == 48


def test_pickles_as_configuration(coordinator):
    copy = pickle.loads(pickle.dumps(coordinator))
    assert repr(copy) == repr(coordinator)
    with coordinator.lock("pickled"):
        assert isinstance(copy.run_exclusive("pickled", lambda: None), palisade.Skipped)


def _child_job(coordinator, i):
    # Runs in a forked child that inherited the parent's runtime and connection (both unusable
    # there): palisade must make its own.
    return coordinator.run_exclusive(f"forked-{i}", lambda: (os.getpid(), palisade.current_job().fencing_token)).value


def test_use_after_fork(coordinator):
    assert coordinator.run_exclusive("forked-0", lambda: 1).ran  # the parent is connected
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.starmap_async(_child_job, [(coordinator, i) for i in range(4)]).get(timeout=120)
    assert {pid for pid, _ in results}.isdisjoint({os.getpid()})
    assert coordinator.run_exclusive("forked-0", lambda: 2).value == 2  # the parent still works


def revoke_all_leases(etcd):
    """What an operator's `etcdctl lease revoke` does to every session (ours included)."""
    etcdctl = find("etcdctl")
    out = subprocess.run([etcdctl, f"--endpoints={etcd}", "lease", "list"],
                         check=True, capture_output=True, text=True, timeout=20).stdout
    for lease in out.split()[3:]:
        subprocess.run([etcdctl, f"--endpoints={etcd}", "lease", "revoke", lease],
                       capture_output=True, timeout=20)


def test_lease_lost_raises_after_the_function_returns(etcd):
    c = palisade.Coordinator.etcd(etcd, ttl=2, namespace=f"py-{uuid.uuid4().hex}/")

    def job():
        revoke_all_leases(etcd)
        ctx = palisade.current_job()
        wait_until(lambda: ctx.lost, "the job to see its lease lost")
        with pytest.raises(palisade.LeaseLost):
            ctx.check()
        return "finished anyway"

    with pytest.raises(palisade.LeaseLost, match="lease was lost"):
        c.run_exclusive("revoked", job)


def test_a_lock_block_whose_lease_was_lost_raises_at_its_end(etcd):
    c = palisade.Coordinator.etcd(etcd, ttl=2, namespace=f"py-{uuid.uuid4().hex}/")
    with pytest.raises(palisade.LeaseLost):
        with c.lock("revoked-block") as guard:
            revoke_all_leases(etcd)
            wait_until(lambda: guard.lost, "the guard to see its lease lost")


def test_etcd_user_and_password(workdir):
    from conftest import Server, free_port, start  # a server of its own: auth changes it
    import tempfile
    import urllib.request

    binary, etcdctl = find("etcd"), find("etcdctl")

    def make():
        client, peer = free_port(), free_port()
        url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        argv = [binary, "--name=auth", f"--data-dir={tempfile.mkdtemp(dir=workdir)}",
                f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=auth={peer_url}"]
        server = Server(argv, lambda: b"true" in urllib.request.urlopen(f"{url}/health", timeout=1).read(),
                        f"etcd (auth) on port {client}", os.path.join(workdir, f"etcd-auth-{client}.log"))
        server.url = url
        return server

    server = start(make)
    try:
        ctl = [etcdctl, f"--endpoints={server.url}"]
        for args in (["user", "add", "root:s3cret"], ["auth", "enable"]):
            subprocess.run(ctl + args, check=True, capture_output=True, timeout=20)
        c = palisade.Coordinator.etcd(server.url, ttl=2, user="root", password="s3cret")
        assert c.run_exclusive("authed", lambda: "ok").value == "ok"
        with pytest.raises(palisade.AuthError, match="rejected the user and password") as info:
            palisade.Coordinator.etcd(server.url, ttl=2, user="root", password="wrong")
        assert "wrong" not in str(info.value) and isinstance(info.value, PermissionError)
        anonymous = palisade.Coordinator.etcd(server.url, ttl=2)  # etcd grants leases to anyone
        with pytest.raises(palisade.AuthError, match="user name is empty"):
            anonymous.run_exclusive("authed", lambda: "not run")
    finally:
        server.stop()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda c: c.run_exclusive("", lambda: 1), palisade.ConfigError),
        (lambda c: c.run_exclusive("x", lambda: 1, wait="soon"), palisade.ConfigError),
        (lambda c: c.run_exclusive("x", lambda: 1, wait=-1), palisade.ConfigError),
        (lambda c: c.lock("x", timeout=float("nan")), palisade.ConfigError),
    ],
)
def test_bad_input_raises_a_clear_exception(tmp_path, call, error):
    c = palisade.Coordinator.file(str(tmp_path))
    with pytest.raises(error):
        call(c)


def test_unreachable_etcd_is_unavailable():
    with pytest.raises(palisade.Unavailable, match="127.0.0.1:1"):
        palisade.Coordinator.etcd("http://127.0.0.1:1", ttl=2)
    with pytest.raises(palisade.ConfigError):
        palisade.Coordinator.etcd([], ttl=2)


def test_ctrl_c_interrupts_a_wait_and_leaves_the_lock_usable(coordinator):
    import signal

    # A process started in the background by a non-interactive shell (CI's `... &`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: a SIGINT does
    # nothing at all (this test hung so). Ctrl-C at a terminal has the default handler; give
    # this test the same, and a bounded wait, so a failure fails instead of hanging.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    holder = coordinator.lock("interrupted")
    holder.__enter__()
    interrupt = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    interrupt.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with coordinator.lock("interrupted", timeout=60):  # GIL released while waiting
                pytest.fail("took a held lock")
    finally:
        interrupt.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 10
    holder.__exit__(None, None, None)
    with coordinator.lock("interrupted", timeout=10) as guard:  # the abandoned wait left nothing
        assert not guard.lost


def test_a_forked_child_does_not_keep_a_released_file_lock(tmp_path):
    c = palisade.Coordinator.file(str(tmp_path))
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    with c.lock("inherited"):
        child = ctx.Process(target=stop.wait, args=(30,))
        child.start()
    try:
        with c.lock("inherited", timeout=0):
            pass
    finally:
        stop.set()
        child.join(30)


def test_semaphore_admits_permits_holders_with_growing_tokens(coordinator):
    slots = [coordinator.semaphore("partner-api", 3, timeout=10) for _ in range(3)]
    guards = [s.__enter__() for s in slots]
    tokens = [g.fencing_token for g in guards]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    with pytest.raises(palisade.LockHeld):
        with coordinator.semaphore("partner-api", 3, timeout=0):
            pytest.fail("a fourth holder")
    with pytest.raises(palisade.ConfigError, match="3 permits"):
        with coordinator.semaphore("partner-api", 2, timeout=0):
            pytest.fail("a holder with other permits")
    slots[0].__exit__(None, None, None)
    with coordinator.semaphore("partner-api", 3, timeout=10) as again:
        assert again.fencing_token > max(tokens)
    for s in slots[1:]:
        s.__exit__(None, None, None)
    with pytest.raises(palisade.ConfigError):
        coordinator.semaphore("partner-api", 0)


def test_semaphore_never_lets_more_than_permits_threads_in(coordinator):
    permits, workers = 2, 8
    inside, most, finished, errors = [0], [0], [], []
    changed = threading.Condition()

    def work(i):
        try:
            with coordinator.semaphore("pool", permits, timeout=60):
                with changed:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    changed.notify_all()
                    # Stay in until `permits` holders were in at once (once is enough): a
                    # semaphore that admits fewer than `permits` fails the assertion below
                    # after this bounded wait instead of passing.
                    changed.wait_for(lambda: most[0] >= permits, timeout=30)
                time.sleep(0.01)  # overlap with the next holders, GIL released
                with changed:
                    inside[0] -= 1
            with changed:
                finished.append(i)
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            with changed:
                errors.append((i, repr(e)))

    run_threads(work, workers, "waiting for the semaphore")
    assert errors == [], f"threads failed: {errors}"
    assert sorted(finished) == list(range(workers)), "every thread held a slot once"
    assert most[0] <= permits, f"{most[0]} threads inside a {permits}-slot semaphore"
    assert most[0] == permits, f"at most {most[0]} holder(s) at once in a {permits}-slot semaphore"


def test_run_limited_runs_at_most_permits_jobs_and_skips_the_rest(coordinator):
    started, release = threading.Barrier(3), threading.Event()
    results = []

    def job(i):
        started.wait(timeout=30)
        jobs = coordinator.running_jobs()
        assert len([j for j in jobs if j["lock"] == "nightly"]) == 2, jobs
        release.wait(timeout=30)
        return i

    def run(i):
        results.append(coordinator.run_limited("nightly", 2, job, i, wait="forever"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=30)  # both jobs run at once
    skipped = coordinator.run_limited("nightly", 2, job, 9, wait=None)
    assert isinstance(skipped, palisade.Skipped)
    release.set()
    for t in threads:
        t.join(timeout=60)
    assert sorted(r.value for r in results) == [0, 1]
    assert len({r.fencing_token for r in results}) == 2
