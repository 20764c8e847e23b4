"""A Redis limiter made while Redis is down: "closed" says so at once, "open" and "local" answer
by their policy from the first decision (an executor that starts during a Redis outage must not
fail), and use Redis once it is up."""

import threading
import time

import pytest

import palisade
from conftest import free_port, redis_ping_refused, redis_server, start_redis_cluster


def down_url() -> tuple:
    port = free_port()  # nothing listens there (yet)
    return port, f"redis://127.0.0.1:{port}/0"


def test_closed_raises_unavailable_when_made_while_redis_is_down():
    _, url = down_url()
    with pytest.raises(palisade.Unavailable):
        palisade.RateLimiter.redis(url, "2/min", on_unavailable="closed", timeout=0.2)


def test_open_admits_while_redis_is_down_and_redis_decides_once_it_is_up(workdir):
    port, url = down_url()
    limiter = palisade.RateLimiter.redis(url, "1/min", on_unavailable="open", timeout=0.2)
    assert all(limiter.check("k").allowed for _ in range(3)), "open admits while Redis is down"
    # Another thread's first decision connects its own way: the policy answers there too.
    seen = []
    t = threading.Thread(target=lambda: seen.append(limiter.check("k").allowed))
    t.start()
    t.join(timeout=30)
    assert seen == [True], f"a new thread's decision while Redis is down: {seen}"

    server = redis_server(workdir, port, name="redis-late")
    try:
        # Once Redis answers, it decides: one admission a minute, then denials.
        deadline = time.monotonic() + 30
        decisions = []
        while True:
            d = limiter.check("k")
            decisions.append(d.allowed)
            if not d.allowed:
                break
            assert time.monotonic() < deadline, f"Redis never decided: {decisions[-5:]}"
            time.sleep(0.02)
    finally:
        server.stop()


def test_local_decides_in_this_process_while_redis_is_down():
    _, url = down_url()
    limiter = palisade.RateLimiter.redis(url, "2/min", on_unavailable="local", timeout=0.2)
    assert [limiter.check("k").allowed for _ in range(3)] == [True, True, False]


def test_a_cluster_limiter_made_while_no_node_answers_follows_its_policy():
    nodes = [down_url()[1], down_url()[1]]
    with pytest.raises(palisade.Unavailable):
        palisade.RateLimiter.redis(nodes, "2/min", cluster=True, on_unavailable="closed",
                                   timeout=0.2)
    opened = palisade.RateLimiter.redis(nodes, "2/min", cluster=True, on_unavailable="open",
                                        timeout=0.2)
    assert [opened.check("k").allowed for _ in range(3)] == [True, True, True]
    local = palisade.RateLimiter.redis(nodes, "2/min", cluster=True, on_unavailable="local",
                                       timeout=0.2)
    assert [local.check("k").allowed for _ in range(3)] == [True, True, False]


def test_a_refused_password_is_an_auth_error_not_an_outage(workdir):
    port = free_port()
    server = redis_server(workdir, port, "--requirepass", "s3cret", name="redis-auth",
                          ready=lambda: redis_ping_refused(port))
    try:
        with pytest.raises(palisade.AuthError):
            palisade.RateLimiter.redis(f"redis://:wrong@127.0.0.1:{port}/0", "1/s")
        no_password = palisade.RateLimiter.redis(f"redis://127.0.0.1:{port}/0", "1/s")
        with pytest.raises(palisade.AuthError):
            no_password.check("k")
        right = palisade.RateLimiter.redis(f"redis://:s3cret@127.0.0.1:{port}/0", "1/s")
        assert right.check("k").allowed
        # The same for a once store on that server.
        with pytest.raises(palisade.AuthError):
            palisade.once("k", lambda: 1, store=f"redis://:wrong@127.0.0.1:{port}/0")
        assert palisade.once("k", lambda: 1, store=f"redis://:s3cret@127.0.0.1:{port}/0") == 1
    finally:
        server.stop()


def test_a_cluster_that_refuses_the_password_is_an_auth_error_whatever_the_policy(workdir):
    servers, urls = start_redis_cluster(workdir, "cluster-auth", password="s3cret")
    try:
        wrong = [u.replace("redis://", "redis://:wrong@") for u in urls]
        for policy in ("closed", "open", "local"):
            with pytest.raises(palisade.AuthError):
                palisade.RateLimiter.redis(wrong, "1/min", cluster=True, on_unavailable=policy)
        right = [u.replace("redis://", "redis://:s3cret@") for u in urls]
        limiter = palisade.RateLimiter.redis(right, "1/min", cluster=True, on_unavailable="open")
        assert [limiter.check("k").allowed for _ in range(2)] == [True, False]
    finally:
        for s in servers:
            s.stop()
