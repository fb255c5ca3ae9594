"""JobPipeline with fake sinks, the Segmind emulator and a real SQLite store (no Discord).

Covers what the e2e tests cannot pin down cheaply: the order of sink calls, shutdown with
waiting and running jobs in both API modes, resuming, slot release before posting, the progress
throttle, the account pause/probe cycle and the 429 hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emulators.segmind import SegmindEmulator
from kontext import images
from kontext import intake as intake_mod
from kontext.errors import KontextError, ServicePaused, ShuttingDown
from kontext.job_options import JobOptions
from kontext.pipeline import Delivery, InputImage, JobOutcome, JobPipeline, JobSpec, ResultInfo
from kontext.queue import SharedQueue
from kontext.segmind import SegmindClient
from kontext.store import Store
from kontext.store.types import OWNER_ACCOUNT, AccountLimits
from tests.dbutil import make_settings, put_job_in_state
from tests.e2e.harness import make_image
from tests.e2e.proc import until

KEY = "sk-pipeline-test-key"
GUILD = 1
_ids = itertools.count(10_000)


class FakeSink:
    """Records what the member would have seen."""

    upload_limit = 10 * 1024 * 1024

    def __init__(self, *, deliver_delay: float = 0.0, fail_post: bool = False) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.posted: Delivery | None = None  # what find_result() sees in the channel
        self.deliver_delay = deliver_delay
        self.fail_post = fail_post
        self.delivering = asyncio.Event()

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    async def queued(self, position: int, total: int, eta_s: float) -> None:
        self.events.append(("queued", position, total, time.monotonic()))

    async def generating(self, elapsed_s: float, estimate_s: float) -> None:
        self.events.append(("generating", elapsed_s, estimate_s, time.monotonic()))

    async def deliver(self, result: ResultInfo) -> Delivery:
        self.delivering.set()
        await asyncio.sleep(self.deliver_delay)
        if self.fail_post:
            from kontext.errors import ResultNotDelivered

            raise ResultNotDelivered("refused")
        self.events.append(("deliver", len(result.image.data)))
        self.posted = Delivery(message_id=next(_ids), channel_id=5)
        return self.posted

    async def find_result(self, since: float) -> Delivery | None:
        self.events.append(("find_result",))
        return self.posted

    async def failed(self, error: KontextError, *, refunded: int) -> None:
        self.events.append(("failed", error, refunded))


async def eventually(get: Any, ok: Any, timeout: float = 5.0) -> Any:
    """Poll ``await get()`` until ``ok(value)``."""
    deadline = time.monotonic() + timeout
    while not ok(value := await get()):
        assert time.monotonic() < deadline, value
        await asyncio.sleep(0.02)
    return value


@dataclass
class Env:
    semu: SegmindEmulator
    store: Store
    queue: SharedQueue
    pipeline: JobPipeline
    url_1: str
    url_2: str
    outcomes: list[JobOutcome]
    remote: dict[int, FakeSink] = field(default_factory=dict)  # sinks of jobs not received here

    def remote_sink(self, job: Any) -> FakeSink:
        return self.remote.setdefault(job.id, FakeSink())

    def next_process(self, worker_id: str) -> tuple[SharedQueue, JobPipeline]:
        """Another process on the same database (same client and HTTP session)."""
        queue = make_queue(self.store, worker_id, self.queue.limits.max_concurrent)
        nxt = JobPipeline(
            settings=self.pipeline.settings, store=self.store, client=self.pipeline.client,
            queue=queue, http=self.pipeline.http, worker_id=worker_id,
        )
        return queue, nxt

    def spec(self, user_id: int | None = None) -> JobSpec:
        job_id = next(_ids)
        return JobSpec(
            job_id=job_id,
            guild_id=GUILD,
            channel_id=5,
            user_id=user_id or job_id,
            options=JobOptions(
                prompt="combine them",
                image_1=InputImage(self.url_1),
                image_2=InputImage(self.url_2),
                aspect_ratio="match_input_image",
                safety_tolerance=1,
                seed=7,
            ),
        )

    async def balance(self, user_id: int) -> int:
        return (await self.store.credits.member_status(GUILD, user_id)).balance


def make_queue(store: Store, worker_id: str, max_concurrent: int) -> SharedQueue:
    return SharedQueue(
        store, worker_id=worker_id, limits=AccountLimits(OWNER_ACCOUNT, max_concurrent, 1000),
        lease_s=5.0, poll_s=0.05, view_s=0.05,
    )


@contextlib.asynccontextmanager
async def pipeline_env(
    tmp_path: Path,
    *,
    mode: str = "sync",
    latency: float = 0.0,
    max_concurrent: int = 2,
    progress: float = 0.05,
    probe: float = 0.1,
    db: str = "k.db",
) -> AsyncIterator[Env]:
    settings = make_settings(
        cooldown_seconds=0, segmind_api_mode=mode, database_url=f"sqlite:///{tmp_path / db}"
    )
    async with SegmindEmulator(api_key=KEY, latency=latency) as semu, aiohttp.ClientSession() as http:
        store = await Store.open(settings.database_url, settings)
        await store.audit.register_worker("w1")
        client = SegmindClient(
            http, api_key=KEY, base_url=semu.base_url, mode=mode, poll_interval_s=0.05,
            backoff_base_s=0.01, backoff_max_s=0.05,
        )
        images.allow_input_host(semu.base_url)  # the emulator hosts the inputs here
        queue = make_queue(store, "w1", max_concurrent)
        pipeline = JobPipeline(
            settings=settings, store=store, client=client, queue=queue, http=http,
            worker_id="w1", progress_interval_s=progress, probe_interval_s=probe,
        )
        outcomes: list[JobOutcome] = []
        pipeline.outcomes.subscribe(outcomes.append)
        env = Env(semu, store, queue, pipeline, semu.host_image(make_image()),
                  semu.host_image(make_image(colour="blue")), outcomes)
        pipeline.start(env.remote_sink)
        try:
            yield env
            assert await store.audit.check_invariants() == []
        finally:
            await queue.aclose()
            await store.close()


async def test_happy_path_calls_the_sink_in_order_and_commits(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path, latency=0.2) as env:
        sink = FakeSink()
        spec = env.spec()
        outcome = await env.pipeline.run(spec, sink)
        assert outcome.status == "posted"
        assert sink.kinds()[-1] == "deliver" and "generating" in sink.kinds()
        assert set(outcome.timings) >= {"checked", "reserved", "started", "api_done", "delivered"}
        job = await env.store.jobs.get(spec.job_id)
        assert job is not None and job.state == "posted" and job.api_charged
        assert await env.balance(spec.user_id) == 9


async def test_slot_is_freed_when_the_api_call_ends_not_after_posting(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path, latency=0.1, max_concurrent=1) as env:
        slow = FakeSink(deliver_delay=0.6)
        first = asyncio.create_task(env.pipeline.run(env.spec(), slow))
        await slow.delivering.wait()
        t = time.monotonic()
        second = await env.pipeline.run(env.spec(), FakeSink())
        assert second.status == "posted"
        assert time.monotonic() - t < 0.55  # did not wait for the first one's slow post
        assert (await first).status == "posted"
        assert env.semu.peak_concurrency == 1


async def test_progress_edits_are_spaced_by_the_interval(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path, latency=0.7, max_concurrent=1, progress=0.3) as env:
        sinks = [FakeSink(), FakeSink()]
        outcomes = await asyncio.gather(
            *(env.pipeline.run(env.spec(), s) for s in sinks)
        )
        assert [o.status for o in outcomes] == ["posted", "posted"]
        for sink in sinks:
            times = [e[-1] for e in sink.events if e[0] in ("queued", "generating")]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            assert all(g >= 0.25 for g in gaps), gaps  # 0.3 s, less scheduling jitter
        # whichever job reserved second waited: it saw its place before its progress bar
        waited = [s for s in sinks if "queued" in s.kinds()]
        assert waited, [s.kinds() for s in sinks]
        for sink in waited:
            assert sink.kinds().index("queued") < sink.kinds().index("generating")


async def test_shutdown_refunds_an_overdue_running_job_and_leaves_waiting_ones_queued(
    tmp_path: Path,
) -> None:
    async with pipeline_env(tmp_path, latency=5.0, max_concurrent=1) as env:
        running, waiting = FakeSink(), FakeSink()
        specs = [env.spec(), env.spec()]
        tasks = [asyncio.create_task(env.pipeline.run(specs[0], running))]
        await env.semu.wait_calls(1)
        tasks.append(asyncio.create_task(env.pipeline.run(specs[1], waiting)))
        await eventually(env.store.queue.count_waiting, lambda n: n == 1)
        t = time.monotonic()
        await env.pipeline.shutdown(0.3, settle_s=1.0)
        assert time.monotonic() - t < 1.0
        outcomes = [await x for x in tasks]  # the callers get an outcome, not a CancelledError
        assert [o.status for o in outcomes] == ["refunded", "queued"]
        err = running.events[-1][1]
        assert running.events[-1][0] == "failed" and isinstance(err, ShuttingDown)
        assert "refunded" in err.user_message("en-US")
        assert "failed" not in waiting.kinds()  # nothing to tell: it stays in the queue
        assert await env.balance(specs[0].user_id) == 10
        assert await env.balance(specs[1].user_id) == 9  # still reserved, for the next process
        # (a) its request was sent: the budget keeps the refunded job's share (Segmind bills it)
        refunded = await env.store.jobs.get(specs[0].job_id)
        assert refunded is not None and refunded.api_charged
        assert (await env.store.budgets.status()).reserved_usd == pytest.approx(0.20)
        job = await env.store.jobs.get(specs[1].job_id)
        assert job is not None and job.state == "accepted" and job.lease_owner is None
        with pytest.raises(ShuttingDown):
            env.pipeline.ensure_accepting()
        # the next process runs it
        queue, nxt = env.next_process("w2")
        nxt.start(env.remote_sink)
        await eventually(
            lambda: env.store.jobs.get(specs[1].job_id), lambda j: j.state == "posted", 20
        )
        assert env.remote[specs[1].job_id].kinds()[-1] == "deliver"
        await nxt.shutdown(1.0)


async def test_shutdown_lets_a_short_job_finish(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path, latency=0.3) as env:
        task = asyncio.create_task(env.pipeline.run(env.spec(), FakeSink()))
        await env.semu.wait_calls(1)
        await env.pipeline.shutdown(5.0)
        assert (await task).status == "posted"


async def test_async_shutdown_hands_over_and_resume_posts_once(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path, mode="async", latency=1.0) as env:
        sink = FakeSink()
        spec = env.spec()
        task = asyncio.create_task(env.pipeline.run(spec, sink))
        await env.semu.wait_calls(1)
        await eventually(lambda: env.store.jobs.get(spec.job_id), lambda j: j and j.api_request_id)
        await env.pipeline.shutdown(0.1)
        assert (await task).status == "handed_over"
        assert sink.events[-1][0] == "generating" and sink.events[-1][1] == -1.0
        assert await env.balance(spec.user_id) == 9  # still reserved: the owner paid for it
        job = await env.store.jobs.get(spec.job_id)
        assert job is not None and job.state == "sent" and job.lease_owner is None  # let go
        # the next process takes it over at once (no lease to wait for)
        queue, nxt = env.next_process("w2")
        nxt.start(env.remote_sink)
        await eventually(lambda: env.store.jobs.get(spec.job_id), lambda j: j.state == "posted")
        sink2 = env.remote[spec.job_id]
        assert "find_result" not in sink2.kinds() and sink2.kinds()[-1] == "deliver"
        assert len(env.semu.calls) == 1 and env.semu.charged_count == 1
        assert await env.balance(spec.user_id) == 9
        await nxt.shutdown(1.0)


async def test_resume_in_sync_mode_refunds_with_a_restart_message(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path) as env:
        spec = env.spec()
        await env.store.ledger.reserve(env.pipeline.intake.reserve_request(spec))
        # a process died mid-call (its request sent), holding no lease
        await put_job_in_state(env.store, spec.job_id, "sent")
        await eventually(lambda: env.store.jobs.get(spec.job_id), lambda j: j.state == "refunded")
        sink = env.remote[spec.job_id]
        assert sink.kinds() == ["failed"]  # nothing to look for: its upload never began
        assert "restarted" in sink.events[-1][1].user_message("en-US")
        assert await env.balance(spec.user_id) == 10
        assert env.semu.calls == []


async def test_a_result_already_in_the_channel_is_committed_not_refunded(tmp_path: Path) -> None:
    """A process died between posting and committing: the next one finds the post (e)."""
    async with pipeline_env(tmp_path) as env:
        spec = env.spec()
        await env.store.ledger.reserve(env.pipeline.intake.reserve_request(spec))
        await put_job_in_state(env.store, spec.job_id, "posting")
        env.remote[spec.job_id] = sink = FakeSink()
        sink.posted = Delivery(message_id=4242, channel_id=5)
        job = await eventually(lambda: env.store.jobs.get(spec.job_id), lambda j: j.state == "posted")
        assert job.result_message_id == 4242 and sink.kinds() == ["find_result"]
        assert await env.balance(spec.user_id) == 9
        assert env.semu.calls == []


async def test_async_request_id_kept_in_memory_when_the_database_refuses_it(
    tmp_path: Path,
) -> None:
    """(c) storing the request id failed after an accepted submit: the job is still polled and
    posted (Segmind bills it), and the id is stored in the background."""
    async with pipeline_env(tmp_path, mode="async", latency=0.3) as env:
        real = env.store.jobs.set_api_request
        calls = []

        async def flaky(*args: Any, **kw: Any) -> bool:
            calls.append(args)
            if len(calls) == 1:
                raise ConnectionResetError("the database went away")
            return await real(*args, **kw)

        env.store.jobs.set_api_request = flaky  # type: ignore[method-assign]
        spec = env.spec()
        outcome = await env.pipeline.run(spec, FakeSink())
        assert outcome.status == "posted"
        assert len(env.semu.calls) == 1 and env.semu.charged_count == 1
        job = await eventually(lambda: env.store.jobs.get(spec.job_id), lambda j: j.state == "posted")
        assert job.api_charged and len(calls) >= 1


async def test_a_job_waiting_past_the_bound_is_refunded_and_told(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path, latency=3.0, max_concurrent=1) as env:
        env.queue.max_wait_s = 0.3
        first = asyncio.create_task(env.pipeline.run(env.spec(), FakeSink()))
        await env.semu.wait_calls(1)
        sink, spec = FakeSink(), env.spec()
        outcome = await env.pipeline.run(spec, sink)
        assert outcome.status == "refunded" and outcome.cause == "queue_timeout"
        assert "waited in the queue too long" in sink.events[-1][1].user_message("en-US")
        assert await env.balance(spec.user_id) == 10
        assert len(env.semu.calls) == 1  # it never reached the API
        assert (await first).status == "posted"


async def test_caller_cancelled_while_waiting_is_refunded(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path, latency=1.0, max_concurrent=1) as env:
        first = asyncio.create_task(env.pipeline.run(env.spec(), FakeSink()))
        await env.semu.wait_calls(1)
        spec = env.spec()
        second = asyncio.create_task(env.pipeline.run(spec, FakeSink()))
        await eventually(env.store.queue.count_waiting, lambda n: n == 1)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert await env.balance(spec.user_id) == 10
        assert (await first).status == "posted"


async def test_account_problem_pauses_and_a_probe_resumes(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path) as env:
        env.semu.fail_next(401)
        out = await env.pipeline.run(env.spec(), FakeSink())
        assert out.status == "refunded" and env.pipeline.paused
        with pytest.raises(ServicePaused):
            env.pipeline.ensure_accepting()
        refused = FakeSink()
        assert (await env.pipeline.run(env.spec(), refused)).status == "rejected"
        assert "needs attention" in refused.events[-1][1].user_message("en-US")
        await until(lambda: not env.pipeline.paused, 3)
        assert (await env.pipeline.run(env.spec(), FakeSink())).status == "posted"


async def test_api_429_slows_the_whole_queue(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path) as env:
        env.semu.fail_next(429, headers={"x-rate-limit-reset-at-utc": "0.2"})
        out = await env.pipeline.run(env.spec(), FakeSink())
        assert out.status == "posted"
        assert env.pipeline.metrics.rate_limited._value.get() == 1
        # the next start was held back for the 429's wait, in every process (the database)
        view = await eventually(env.store.queue.view, lambda v: v.blocked_until > 0)
        assert view.blocked_until > view.now - 5


async def test_failed_post_is_refunded_and_charged_to_the_owner_only(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path) as env:
        spec = env.spec()
        sink = FakeSink(fail_post=True)
        out = await env.pipeline.run(spec, sink)
        assert out.status == "refunded" and out.cause == "post_failed"
        assert await env.balance(spec.user_id) == 10
        job = await env.store.jobs.get(spec.job_id)
        assert job is not None and job.api_charged  # the API billed it; the budget keeps it


# --- intake and unsure reservations --------------------------------------------------------------


async def test_reservation_with_an_unknown_outcome_is_refunded(tmp_path: Path) -> None:
    """The reservation was written but its caller saw an error (a connection lost at COMMIT):
    the member is told 'not charged', and a background refund makes that true."""
    async with pipeline_env(tmp_path) as env:
        real_reserve = env.store.ledger.reserve

        async def reserve_then_fail(req: Any) -> Any:
            await real_reserve(req)
            raise ConnectionResetError("connection lost while committing")

        env.store.ledger.reserve = reserve_then_fail  # type: ignore[method-assign]
        sink = FakeSink()
        spec = env.spec()
        outcome = await env.pipeline.run(spec, sink)
        assert outcome.status == "rejected" and outcome.cause == "internal"
        assert sink.kinds() == ["failed"] and sink.events[0][2] == 0
        assert "not charged" in sink.events[0][1].user_message("en")
        job = await eventually(lambda: env.store.jobs.get(spec.job_id),
                               lambda j: j is not None and j.state == "refunded")
        assert job.failure_cause == "internal"
        assert await env.balance(spec.user_id) == 10
        assert env.semu.calls == []


async def test_unsure_refund_leaves_another_process_s_job_alone(tmp_path: Path) -> None:
    async with pipeline_env(tmp_path) as env:
        spec = env.spec()
        _, other = env.next_process("w2")  # not started: it only reserves
        env.pipeline.queue.stop_claiming()  # keep the job waiting
        await env.store.ledger.reserve(other.intake.reserve_request(spec))  # w2 received this job
        assert not await env.pipeline.settlement.refund_if_ours(spec.job_id)
        job = await env.store.jobs.get(spec.job_id)
        assert job is not None and job.state == "accepted"
        assert await env.store.ledger.refund(spec.job_id, cause="test")


async def test_images_are_checked_a_few_jobs_at_a_time_in_arrival_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pipeline_env(tmp_path, max_concurrent=8) as env:
        started: list[int] = []
        running = 0
        peak = 0
        gate = asyncio.Event()

        async def slow_check(spec: JobSpec) -> None:
            nonlocal running, peak
            started.append(spec.job_id)
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

        monkeypatch.setattr(env.pipeline.intake, "check_inputs", slow_check)
        specs = [env.spec() for _ in range(intake_mod.INTAKE_AT_ONCE * 2)]
        tasks = [asyncio.create_task(env.pipeline.run(s, FakeSink())) for s in specs]
        await eventually(lambda: _value(len(started)), lambda n: n == intake_mod.INTAKE_AT_ONCE)
        # the first arrivals get the first turns (within a turn, each first reads what could
        # refuse it, so they may start their downloads in any order)
        first = [s.job_id for s in specs[: intake_mod.INTAKE_AT_ONCE]]
        assert sorted(started) == first
        gate.set()
        outcomes = await asyncio.gather(*tasks)
        assert [o.status for o in outcomes] == ["posted"] * len(specs)
        assert sorted(started[len(first):]) == [s.job_id for s in specs[len(first):]]
        assert peak == intake_mod.INTAKE_AT_ONCE


async def test_a_slow_check_gives_up_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_mod, "INTAKE_AT_ONCE", 1)
    monkeypatch.setattr(intake_mod, "INTAKE_SLOT_S", 0.05)
    async with pipeline_env(tmp_path) as env:
        env.pipeline.intake.turns = asyncio.Semaphore(1)
        hang = asyncio.Event()
        first, second = env.spec(), env.spec()
        real_check = env.pipeline.intake.check_inputs

        async def check(spec: JobSpec) -> None:
            if spec.job_id == first.job_id:
                await hang.wait()  # a download that takes its time
            await real_check(spec)

        monkeypatch.setattr(env.pipeline.intake, "check_inputs", check)
        slow = asyncio.create_task(env.pipeline.run(first, FakeSink()))
        quick = await env.pipeline.run(second, FakeSink())  # not held up by the slow one
        assert quick.status == "posted" and not slow.done()
        hang.set()
        assert (await slow).status == "posted"


async def test_jobs_checked_when_shutdown_begins_are_not_reserved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pipeline_env(tmp_path) as env:
        checking = asyncio.Event()
        release = asyncio.Event()

        async def check(spec: JobSpec) -> None:
            checking.set()
            await release.wait()

        monkeypatch.setattr(env.pipeline.intake, "check_inputs", check)
        spec = env.spec()
        sink = FakeSink()
        task = asyncio.create_task(env.pipeline.run(spec, sink))
        await checking.wait()
        env.pipeline.lifecycle.accepting = False  # what shutdown() does first
        release.set()
        outcome = await task
        assert outcome.status == "rejected" and outcome.cause == "shutdown"
        assert await env.store.jobs.get(spec.job_id) is None  # nothing reserved, nothing to refund


async def _value(v: Any) -> Any:
    return v
