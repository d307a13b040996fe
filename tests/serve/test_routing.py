"""Routing policies on synthetic replica snapshots (no processes)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from veil.errors import ConfigError, VeilError
from veil.serve.routing import (
    EpcAware,
    NoReplicaAvailable,
    Replica,
    RequestInfo,
    RoutingPolicy,
    epc_score,
    get_policy,
    policy_names,
)

REQ = RequestInfo(model="m")


def reps(*specs: tuple[str, int, float]) -> list[Replica]:
    return [
        Replica(id=i, url=f"http://127.0.0.1:{9000 + n}", host=f"h{n}", outstanding=o, epc_pressure=p)
        for n, (i, o, p) in enumerate(specs)
    ]


def test_round_robin_cycles_in_id_order_and_skips_unhealthy() -> None:
    pol = get_policy("round-robin")
    rs = reps(("b", 0, 0.0), ("a", 5, 0.0), ("c", 0, 0.0))
    picks = [pol.choose(rs, REQ, 0.0).id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    rs[0] = Replica(id="b", url="u", healthy=False)
    picks = [pol.choose(rs, REQ, 0.0).id for _ in range(4)]
    assert set(picks) == {"a", "c"}


def test_least_outstanding_picks_min_and_rotates_ties() -> None:
    pol = get_policy("least-outstanding")
    rs = reps(("a", 3, 0.0), ("b", 1, 0.0), ("c", 2, 0.0))
    assert pol.choose(rs, REQ, 0.0).id == "b"
    rs = reps(("a", 0, 0.0), ("b", 0, 0.0), ("c", 4, 0.0))
    assert {pol.choose(rs, REQ, 0.0).id for _ in range(4)} == {"a", "b"}


def test_p2c_is_seeded_and_never_picks_the_busiest() -> None:
    rs = reps(("a", 0, 0.0), ("b", 1, 0.0), ("c", 2, 0.0), ("d", 9, 0.0))
    p1 = get_policy("p2c", seed=7)
    p2 = get_policy("power_of_two_choices", rng=random.Random(7))
    s1 = [p1.choose(rs, REQ, 0.0).id for _ in range(200)]
    s2 = [p2.choose(rs, REQ, 0.0).id for _ in range(200)]
    assert s1 == s2
    c = Counter(s1)
    assert "d" not in c  # the most loaded replica always loses its comparison
    assert c["a"] > c["b"] > c["c"] > 0


def test_epc_aware_avoids_paging_host_until_queue_outweighs_it() -> None:
    pol = get_policy("epc-aware", pressure_weight=4.0, default_service_s=0.05)
    # same queue: the non-paging host wins
    rs = reps(("a", 1, 0.5), ("b", 1, 0.0))
    assert pol.choose(rs, REQ, 0.0).id == "b"
    # paging slows a by 1 + 4*0.5 = 3x: a queue of 2 on a (3*0.05*3=0.45) beats 9 on b (10*0.05=0.5)
    rs = reps(("a", 2, 0.5), ("b", 9, 0.0))
    assert pol.choose(rs, REQ, 0.0).id == "a"
    rs = reps(("a", 2, 0.5), ("b", 7, 0.0))
    assert pol.choose(rs, REQ, 0.0).id == "b"


def test_epc_aware_uses_latency_estimates_and_hard_pressure() -> None:
    pol = EpcAware()
    slow = Replica(id="a", url="u", service_time_s=0.4)
    fast = Replica(id="b", url="u", service_time_s=0.01, outstanding=5)
    assert pol.choose([slow, fast], REQ, 0.0).id == "b"
    hot = Replica(id="c", url="u", epc_pressure=1.5)
    busy = Replica(id="d", url="u", outstanding=50)
    assert pol.choose([hot, busy], REQ, 0.0).id == "d"
    assert epc_score(hot) > 60.0
    assert pol.choose([hot], REQ, 0.0).id == "c"  # still used when it is the only one


def test_model_filter_draining_and_no_replica() -> None:
    rs = [
        Replica(id="a", url="u", models=frozenset({"x"})),
        Replica(id="b", url="u", draining=True),
        Replica(id="c", url="u", models=frozenset({"m"})),
    ]
    for name in policy_names():
        pol = get_policy(name)
        assert isinstance(pol, RoutingPolicy)
        assert pol.choose(rs, REQ, 0.0).id == "c"
        with pytest.raises(NoReplicaAvailable):
            pol.choose(rs, RequestInfo(model="zzz"), 0.0)
        with pytest.raises(VeilError):
            pol.choose([], REQ, 0.0)


def test_get_policy_errors() -> None:
    with pytest.raises(ConfigError, match="unknown routing policy"):
        get_policy("random-walk")
    with pytest.raises(ConfigError, match="bad parameters"):
        get_policy("round-robin", nope=1)
    with pytest.raises(ConfigError):
        get_policy("epc-aware", hard_pressure=0)


def test_replica_is_frozen() -> None:
    r = Replica(id="a", url="u")
    with pytest.raises(AttributeError):
        r.outstanding = 3  # type: ignore[misc]
