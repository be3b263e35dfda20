"""Bad service definitions fail early with a message that says what to fix."""

from __future__ import annotations

import functools
import random

import pytest

import nursery_down as nd
from nursery_down._spec import Backoff, make_spec, start_order


async def noop(ctx: nd.ServiceContext) -> None:
    ctx.ready()


def spec(name: str, *after: str) -> object:
    return make_spec(
        noop,
        name=name,
        restart="permanent",
        after=after,
        grace=None,
        max_restarts=1,
        within=1.0,
        backoff=None,
    )


def test_a_service_must_be_an_async_function() -> None:
    sup = nd.Supervisor("bad")

    def not_async(ctx: nd.ServiceContext) -> None: ...

    with pytest.raises(nd.ConfigurationError, match="must be an async function"):
        sup.add(not_async)  # type: ignore[arg-type]


def test_partials_of_async_functions_are_accepted() -> None:
    async def with_arg(ctx: nd.ServiceContext, value: int) -> None: ...

    sup = nd.Supervisor("partials")
    sup.add(functools.partial(with_arg, value=1), name="bound")
    assert sup.service_names == ["bound"]


def test_duplicate_names_are_refused() -> None:
    sup = nd.Supervisor("dup")
    sup.add(noop, name="x")
    with pytest.raises(nd.ConfigurationError, match="already has a service named 'x'"):
        sup.add(noop, name="x")


def test_unknown_dependency_is_named() -> None:
    sup = nd.Supervisor("deps")
    sup.add(noop, name="api", after=["db"])
    with pytest.raises(nd.ConfigurationError, match=r"starts after 'db'.*registered: api"):
        sup.check()


def test_dependency_cycle_names_the_services() -> None:
    sup = nd.Supervisor("cycle")
    sup.add(noop, name="a", after=["c"])
    sup.add(noop, name="b", after=["a"])
    sup.add(noop, name="c", after=["b"])
    with pytest.raises(nd.DependencyCycleError, match="a -> c -> b -> a"):
        sup.check()


def test_a_service_cannot_start_after_itself() -> None:
    with pytest.raises(nd.ConfigurationError, match="after itself"):
        nd.Supervisor("self").add(noop, name="a", after=["a"])


@pytest.mark.parametrize("grace", [-1.0, float("nan"), float("inf"), "10"])
def test_grace_must_be_a_finite_non_negative_number(grace: object) -> None:
    with pytest.raises(nd.ConfigurationError, match="grace must be a finite number >= 0"):
        nd.Supervisor("g", grace=grace)  # type: ignore[arg-type]
    with pytest.raises(nd.ConfigurationError, match="grace must be a finite number >= 0"):
        nd.Supervisor("g").add(noop, grace=grace)  # type: ignore[arg-type]


def test_restart_policy_must_be_known() -> None:
    with pytest.raises(nd.ConfigurationError, match="'permanent', 'transient' or 'temporary'"):
        nd.Supervisor("p").add(noop, restart="sometimes")


def test_max_restarts_must_be_a_whole_number() -> None:
    with pytest.raises(nd.ConfigurationError, match="max_restarts"):
        nd.Supervisor("m").add(noop, max_restarts=-1)


def test_a_supervisor_without_services_is_a_configuration_error() -> None:
    with pytest.raises(nd.ConfigurationError, match="has no services"):
        nd.Supervisor("empty").check()


def test_start_order_keeps_registration_order_where_after_allows() -> None:
    specs = [spec("web", "cache"), spec("metrics"), spec("cache", "db"), spec("db")]
    assert [s.name for s in start_order(specs)] == ["db", "cache", "web", "metrics"]  # type: ignore[arg-type]


def test_backoff_doubles_up_to_its_maximum() -> None:
    import random

    backoff = Backoff(initial=1.0, factor=2.0, maximum=5.0, jitter=0.0)
    rng = random.Random(0)
    assert [backoff.delay(n, rng) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "options",
    [{"initial": -1.0}, {"factor": 0.5}, {"jitter": 1.0}, {"initial": 10.0, "maximum": 1.0}],
)
def test_backoff_refuses_nonsense(options: dict[str, float]) -> None:
    with pytest.raises(nd.ConfigurationError, match="Backoff"):
        Backoff(**options)


def test_the_default_backoff_starts_at_0_1_s_doubles_up_to_30_s_with_10_percent_jitter() -> None:
    backoff = nd.Backoff()
    rng = random.Random(0)
    for restart in range(1, 13):
        base = min(30.0, 0.1 * 2.0 ** (restart - 1))
        ratios = [backoff.delay(restart, rng) / base for _ in range(500)]
        assert 0.9 <= min(ratios) < 0.91
        assert 1.09 < max(ratios) <= 1.1


@pytest.mark.parametrize("name", ["2nd-pass", "9", "0.worker", "1_" + "x" * 62])
def test_a_service_name_may_begin_with_a_digit(name: str) -> None:
    sup = nd.Supervisor("digits")
    sup.add(noop, name=name)
    assert sup.service_names == [name]
