import multiprocessing
import os
import threading
import time
import uuid

import pytest

import palisade
from conftest import run_threads


@pytest.fixture(params=["file", "redis", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/once"
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return "memory://"


def key():
    return f"k-{uuid.uuid4().hex}"


def test_runs_once_then_replays(store):
    k, calls = key(), []

    def charge(amount, currency="EUR"):
        calls.append(amount)
        return {"charged": amount, "currency": currency}

    first = palisade.once(k, charge, 42, store=store, currency="USD")
    again = palisade.once(k, charge, 42, store=store, currency="USD")
    assert first == again == {"charged": 42, "currency": "USD"}
    assert calls == [42]


def test_an_exception_is_reraised_and_not_recorded(store):
    k = key()
    with pytest.raises(ZeroDivisionError):
        palisade.once(k, lambda: 1 / 0, store=store, fingerprint="f")
    assert palisade.once(k, lambda: "second try", store=store, fingerprint="f") == "second try"


def test_a_result_that_is_not_json_is_a_type_error_and_not_recorded(store):
    k = key()
    with pytest.raises(TypeError):
        palisade.once(k, lambda: object(), store=store, fingerprint="f")
    assert palisade.once(k, lambda: [1], store=store, fingerprint="f") == [1]


def test_a_key_reused_for_another_request_is_refused(store):
    k = key()
    palisade.once(k, lambda: 1, store=store, fingerprint="a")
    with pytest.raises(palisade.FingerprintMismatch) as info:
        palisade.once(k, lambda: 1, store=store, fingerprint="b")
    assert isinstance(info.value, palisade.OnceError) and isinstance(info.value, palisade.Error)


def test_a_key_in_progress_is_refused(store):
    k, started, release = key(), threading.Event(), threading.Event()

    def slow():
        started.set()
        assert release.wait(30)
        return "slow"

    t = threading.Thread(target=lambda: palisade.once(k, slow, store=store, fingerprint="f"))
    t.start()
    try:
        assert started.wait(30)
        with pytest.raises(palisade.InProgress) as info:
            palisade.once(k, lambda: "other", store=store, fingerprint="f")
        assert isinstance(info.value, palisade.OnceError) and isinstance(info.value, palisade.Error)
        waited_from = time.monotonic()
        with pytest.raises(palisade.InProgress):  # a wait that runs out raises the same
            palisade.once(k, lambda: "other", store=store, fingerprint="f", wait=0.2)
        assert time.monotonic() - waited_from >= 0.2, "wait=0.2 gave up before waiting"
    finally:
        release.set()
        t.join(30)
    assert not t.is_alive(), "the first call did not finish after its job was released"
    assert palisade.once(k, lambda: "other", store=store, fingerprint="f") == "slow"


def _in_child(store, k):
    return palisade.once(k, lambda: os.getpid(), store=store, fingerprint="fork")


def test_use_after_fork(tmp_path, redis_url):
    for store in (f"file://{tmp_path}/once", redis_url):
        palisade.once(key(), lambda: 0, store=store)  # the parent is connected before the fork
        keys = [key() for _ in range(4)]
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pids = pool.starmap_async(_in_child, [(store, k) for k in keys]).get(timeout=120)
        assert os.getpid() not in pids
        assert [_in_child(store, k) for k in keys] == pids  # replayed in the parent


def test_sixteen_threads_run_each_key_once(redis_url):
    keys = [key() for _ in range(4)]
    runs, lock = [], threading.Lock()
    results, errors = {}, []  # by thread: what each call returned; what any thread raised

    def job(k):
        with lock:
            runs.append(k)
        return k

    def work(i):
        got = []
        try:
            for k in keys:
                # wait=30: a call that finds the key in progress waits for its result instead
                # of raising InProgress.
                got.append(palisade.once(k, job, k, store=redis_url, fingerprint="t", wait=30))
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            with lock:
                errors.append((i, repr(e)))
        with lock:
            results[i] = got

    run_threads(work, 16, "waiting")
    assert errors == [], f"calls raised (InProgress means wait= did not wait): {errors}"
    assert results == {i: keys for i in range(16)}, "every thread gets every key's result"
    assert sorted(runs) == sorted(keys), "each key's job ran exactly once"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"store": "ftp://x"}, palisade.ConfigError, "expected file:///dir"),
        ({"store": "file://"}, palisade.ConfigError, "needs a directory"),
        ({"store": "memory://", "ttl": -1}, palisade.ConfigError, "ttl"),
        ({"store": "redis://127.0.0.1:1/0"}, palisade.Unavailable, "127.0.0.1:1"),
    ],
)
def test_bad_input_raises_a_clear_exception(kwargs, error, match):
    with pytest.raises(error, match=match):
        palisade.once(key(), lambda: 1, **kwargs)


def test_an_empty_key_is_a_config_error():
    with pytest.raises(palisade.ConfigError):
        palisade.once("", lambda: 1, store="memory://")
