import asyncio
import multiprocessing
import pickle
import threading
import time
import uuid

import pytest

import palisade


@pytest.fixture(params=["redis", "file", "local"])
def make(request, tmp_path):
    def make_limiter(limits, **kw):
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            return palisade.RateLimiter.redis(url, limits, prefix=f"t-{uuid.uuid4().hex}:", **kw)
        if request.param == "file":
            return palisade.RateLimiter.file(str(tmp_path / "limits"), limits)
        return palisade.RateLimiter.local(limits)

    make_limiter.kind = request.param
    return make_limiter


def test_check_admits_up_to_the_limit_then_says_when(make):
    limiter = make("3/10s")
    decisions = [limiter.check("user:1") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    denied = decisions[3]
    assert not denied and 0 < denied.retry_after <= 10 and denied.reset_after > 0
    h = denied.headers()
    assert h["RateLimit-Policy"] == '"default";q=3;w=10' and int(h["Retry-After"]) >= 1
    assert limiter.check("user:2").allowed  # keys are independent


def test_acquire_gives_up_at_once_when_the_timeout_cannot_be_met(make):
    limiter = make("2/h")
    for _ in range(2):
        assert limiter.acquire("k").allowed
    started = time.monotonic()
    with pytest.raises(palisade.RateLimited) as info:
        limiter.acquire("k", timeout=60)  # the next unit is minutes away
    # Raised as soon as it knew, not after sleeping to the deadline (60 s).
    assert time.monotonic() - started < 30
    assert info.value.retry_after > 60 and isinstance(info.value, palisade.Error)


def test_acquire_waits_for_the_window(make):
    limiter = make("2/s")
    for _ in range(2):
        assert limiter.acquire("k").allowed
    started = time.monotonic()
    with pytest.raises(palisade.RateLimited) as info:
        limiter.acquire("k", timeout=0.05)
    assert info.value.retry_after > 0.05
    assert limiter.acquire("k", timeout=5).allowed
    assert time.monotonic() - started >= 0.2  # it waited for the window to move


def test_acquire_async(make):
    limiter = make("1/s")

    async def main():
        first = await limiter.acquire_async("a")
        started = time.monotonic()
        second = await limiter.acquire_async("a", timeout=5)
        waited = time.monotonic() - started
        return first, second, waited

    first, second, waited = asyncio.run(main())
    assert first.allowed and second.allowed and waited > 0.3


def test_cancelling_acquire_async_stops_the_wait_without_consuming(make):
    limiter = make("1/s")

    async def main():
        assert (await limiter.acquire_async("a")).allowed  # the window is full for ~1 s
        waiting = limiter.acquire_async("a")  # its wait has started (on the runtime)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert waiting.cancelled()
        # Peeks (cost=0) consume nothing. Wait, bounded, until the unit comes back...
        deadline = time.monotonic() + 20
        while limiter.check("a", cost=0).remaining < 1:
            assert time.monotonic() < deadline, "the unit never came back"
            await asyncio.sleep(0.01)
        # ...then watch it for a while: a wait that had not stopped would take it now (its
        # retry comes within ~20 ms of the unit's return) and hold it for a second.
        watch_until = time.monotonic() + 0.5
        while time.monotonic() < watch_until:
            peek = limiter.check("a", cost=0)
            assert peek.remaining == 1, f"the cancelled acquire_async took the unit: {peek!r}"
            await asyncio.sleep(0.02)
        return limiter.check("a")

    after = asyncio.run(main())
    assert after.allowed and after.remaining == 0


@pytest.mark.parametrize("algorithm", ["sliding_log", "sliding_window", "gcra"])
def test_each_redis_algorithm_admits_the_limit_then_denies(redis_url, algorithm):
    # Per day: no unit comes back (GCRA: one every 8 h) while the test runs, and the sliding
    # window counter's window does not roll over in it (its estimate then rounds down).
    limiter = palisade.RateLimiter.redis(redis_url, "3/d", algorithm=algorithm,
                                         prefix=f"a-{uuid.uuid4().hex}:")
    decisions = [limiter.check("k") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False], decisions
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].retry_after > 0 and decisions[3].limit == 3
    assert limiter.check("other").allowed  # keys are independent


def test_gcra_burst_admits_burst_units_back_to_back(redis_url):
    limiter = palisade.RateLimiter.redis(redis_url, "10/min", algorithm="gcra", burst=2,
                                         prefix=f"b-{uuid.uuid4().hex}:")
    assert [limiter.check("k").allowed for _ in range(3)] == [True, True, False]


@pytest.fixture(params=["redis", "file"])
def make_shared(request, tmp_path):
    """The limiters that take several limits (the local one takes one)."""
    def make_limiter(limits):
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            return palisade.RateLimiter.redis(url, limits, prefix=f"m-{uuid.uuid4().hex}:")
        return palisade.RateLimiter.file(str(tmp_path / f"limits-{uuid.uuid4().hex}"), limits)

    return make_limiter


def test_with_two_limits_the_tighter_one_decides(make_shared):
    per_minute = make_shared(["10/s", "3/min"])  # the minute's limit is reached first
    decisions = [per_minute.check("k") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    denied = decisions[3]
    assert (denied.limit, denied.window) == (3, 60.0), "the denial describes the 3/min limit"
    assert denied.retry_after > 1, "denied until the minute's window moves, not the second's"

    per_ten_seconds = make_shared(["5/min", "2/10s"])  # the 10 s limit is reached first
    decisions = [per_ten_seconds.check("k") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert (decisions[2].limit, decisions[2].window) == (2, 10.0)
    assert 0 < decisions[2].retry_after <= 10


def test_a_cost_consumes_that_many_units_and_a_denied_one_none(make):
    limiter = make("5/h")  # no unit comes back while the test runs (local GCRA: one per 12 min)
    first = limiter.check("k", cost=3)
    assert first.allowed and first.remaining == 2
    assert not limiter.check("k", cost=3).allowed
    assert limiter.check("k", cost=0).remaining == 2, "a denied cost consumed units"
    rest = limiter.check("k", cost=2)
    assert rest.allowed and rest.remaining == 0
    assert not limiter.check("k").allowed
    peek = limiter.check("k", cost=0)  # a peek: consumes nothing, says what is left
    assert peek.remaining == 0
    with pytest.raises(palisade.ConfigError):
        limiter.check("k", cost=6)  # more than the limit can ever admit


def test_reset_forgets_one_key(make):
    limiter = make("2/h")
    for key in ("k", "other"):
        assert [limiter.check(key).allowed for _ in range(3)] == [True, True, False]
    limiter.reset("k")
    again = limiter.check("k")
    assert again.allowed and again.remaining == 1, "reset did not clear the key's history"
    assert not limiter.check("other").allowed, "reset cleared another key"
    limiter.reset("never-seen")  # nothing to forget: not an error


def test_sixteen_threads_share_one_limiter_and_never_exceed_it(make):
    limiter = make("50/min")
    admitted, lock = [0], threading.Lock()
    barrier = threading.Barrier(16)

    def work():
        barrier.wait()
        for _ in range(10):
            if limiter.check("shared").allowed:
                with lock:
                    admitted[0] += 1

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert admitted[0] == 50


def test_pickles_as_configuration(make):
    limiter = make("2/min")
    assert limiter.check("p").allowed
    copy = pickle.loads(pickle.dumps(limiter))
    assert repr(copy) == repr(limiter)
    assert copy.check("p").remaining == 0  # the same state (same process, same limiter)


def _use(limiter):
    return limiter.check("forked").allowed


def test_use_after_fork(make):
    limiter = make("5/min")
    assert limiter.check("forked").allowed  # the parent is connected before the fork
    # A local limiter lives in each process (a worker's starts empty), so 4 checks are admitted
    # whichever worker gets how many. The shared limiters admit 4 more in all, whoever asks.
    calls = 4 if make.kind == "local" else 6
    with multiprocessing.get_context("fork").Pool(2) as pool:
        allowed = pool.map_async(_use, [limiter] * calls).get(timeout=120)
    if make.kind == "local":
        assert all(allowed)  # each process has its own in-process limiter
    else:
        assert sorted(allowed) == [False, False] + [True] * 4  # shared across processes


def _check_inherited(limiter, results):
    results.put(limiter.check("inherited").remaining)


def test_an_inherited_limiter_works_in_a_forked_child(make):
    limiter = make("5/min")
    assert limiter.check("inherited").remaining == 4  # built (and connected) in the parent
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    # With fork, a Process's arguments are inherited, not pickled: the child holds the parent's
    # limiter object, whose connection and runtime belong to the parent.
    child = ctx.Process(target=_check_inherited, args=(limiter, results))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0, f"the child failed (exit code {child.exitcode})"
    # A shared limiter's state is shared; an in-process limiter starts empty in each process.
    assert results.get(timeout=30) == (4 if make.kind == "local" else 3)
    after = limiter.check("inherited").remaining
    assert after == (3 if make.kind == "local" else 2), "the parent still works"


@pytest.mark.parametrize(
    "limits, match",
    [("100/fortnight", "no known unit"), ("lots", "has no `/`"), ([], "at least one"), (5, "limits")],
)
def test_a_bad_limit_string_is_a_config_error(tmp_path, limits, match):
    with pytest.raises(palisade.ConfigError, match=match):
        palisade.RateLimiter.file(str(tmp_path), limits)


def test_bad_options_and_costs(redis_url):
    with pytest.raises(palisade.ConfigError, match="algorithm"):
        palisade.RateLimiter.redis(redis_url, "1/s", algorithm="leaky")
    with pytest.raises(palisade.ConfigError, match="on_unavailable"):
        palisade.RateLimiter.redis(redis_url, "1/s", on_unavailable="maybe")
    with pytest.raises(palisade.ConfigError):
        palisade.RateLimiter.local("5/s").check("k", cost=6)


def test_unreachable_redis(tmp_path):
    with pytest.raises(palisade.Unavailable):
        palisade.RateLimiter.redis("redis://127.0.0.1:1/0", "1/s")


def test_on_unavailable_policies_when_redis_goes_away(workdir):
    from conftest import free_port, redis_server, start

    server = start(lambda: redis_server(workdir, free_port(), name="redis-gone"))
    try:
        limiters = {
            policy: palisade.RateLimiter.redis(server.url, "2/min", on_unavailable=policy,
                                               timeout=0.5, prefix=f"gone-{policy}:")
            for policy in ("closed", "open", "local")
        }
        for limiter in limiters.values():
            assert limiter.check("k").allowed
    finally:
        server.stop()
    started = time.monotonic()
    with pytest.raises(palisade.Unavailable):
        limiters["closed"].check("k")
    assert limiters["open"].check("k").allowed
    local = [limiters["local"].check("k").allowed for _ in range(3)]
    assert local == [True, True, False]  # decided in this process, with the same limit
    assert time.monotonic() - started < 30


def test_redis_cluster_limits_each_key_exactly_and_pickles(redis_cluster):
    lim = palisade.RateLimiter.redis(redis_cluster, "5/min", cluster=True,
                                     prefix=f"c-{uuid.uuid4().hex}:")
    for key in ("alpha", "beta", "gamma", "delta"):  # keys in different slots
        assert [lim.check(key).allowed for _ in range(6)] == [True] * 5 + [False]
    again = pickle.loads(pickle.dumps(lim))
    assert again.check("alpha").allowed is False, "the copy decides on the same cluster state"
    one_node = palisade.RateLimiter.redis(redis_cluster[0], "5/min", cluster=True,
                                          prefix=f"c-{uuid.uuid4().hex}:")
    assert one_node.check("k").allowed, "one node's URL is enough to find the cluster"
    with pytest.raises(palisade.ConfigError, match="cluster=True"):
        palisade.RateLimiter.redis(redis_cluster, "5/min")


def test_rediss_with_a_private_ca(redis_tls):
    lim = palisade.RateLimiter.redis(redis_tls["url"], "3/min", tls_ca=redis_tls["ca"],
                                     prefix=f"t-{uuid.uuid4().hex}:")
    assert [lim.check("k").allowed for _ in range(4)] == [True, True, True, False]
    assert pickle.loads(pickle.dumps(lim)).check("k").allowed is False
    # The system's roots do not know the test CA: refused, saying why (retrying does not help).
    with pytest.raises(palisade.AuthError, match="(?i)certificate"):
        palisade.RateLimiter.redis(redis_tls["url"], "3/min", timeout=2)
    # "open" connects at the first check: a refused certificate is not an outage to admit through.
    lazy = palisade.RateLimiter.redis(redis_tls["url"], "3/min", on_unavailable="open", timeout=5)
    with pytest.raises(palisade.AuthError, match="(?i)certificate"):
        lazy.check("k")
    with pytest.raises(palisade.ConfigError, match="tls_ca"):
        palisade.RateLimiter.redis(redis_tls["url"], "3/min", tls_ca="/nonexistent/ca.pem")
