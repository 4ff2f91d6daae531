"""Admission order and queue waits on an injected clock: priority, aging, tenants' turns,
expiry of requests that waited too long, preempted sequences first."""
from shardline.protocol.plan import SampledToken
from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.request import Sequence, SeqStatus
from shardline.scheduler.scheduler import Scheduler
from shardline.scheduler.waiting_queue import WaitingQueue


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def seq(i, priority=0, tenant="", max_tokens=1):
    return Sequence(seq_id=i, prompt_token_ids=[1, 2, 3], max_tokens=max_tokens,
                    priority=priority, tenant=tenant)


def admit_one_per_step(s: Scheduler) -> int:
    """Run one step (every running sequence of max_tokens 1 finishes); the admitted seq id."""
    batch = s.schedule()
    admitted = [q.seq_id for q, st in batch.items if st.admit]
    s.postprocess(batch, [SampledToken(q.seq_id, 7) for q, st in batch.items if st.sample])
    assert len(admitted) == 1
    return admitted[0]


def test_higher_priority_is_admitted_first_then_first_come_first_served():
    clock = Clock()
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, clock=clock)
    for i, p in [(1, 0), (2, 5), (3, 1), (4, 5), (5, -2)]:
        s.add(seq(i, priority=p))
    batch = s.schedule()
    assert [q.seq_id for q, _ in batch.items] == [2, 4, 3, 1, 5]
    assert all(q.first_admitted_at == 0.0 for q, _ in batch.items)


def test_aging_lets_a_low_priority_request_through_a_flood():
    def run(aging_s):
        clock = Clock()
        s = Scheduler(BlockManager(64, 4), max_num_seqs=1, priority_aging_s=aging_s, clock=clock)
        s.add(seq(1, priority=0))                    # queued at t = 0
        order = []
        for t in range(1, 40):                       # a priority-2 request every second
            clock.now = float(t)
            s.add(seq(100 + t, priority=2))
            order.append((t, admit_one_per_step(s)))
        return order

    # level = priority + waited // 10: seq 1 reaches level 2 at t = 20, ties with the flood's
    # fresh requests and was queued first
    assert [t for t, sid in run(aging_s=10.0) if sid == 1] == [20]
    assert all(sid != 1 for _, sid in run(aging_s=0.0))   # no aging: starved


def test_tenants_take_turns_when_one_floods():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=1, clock=Clock())
    for i in range(1, 7):
        s.add(seq(i, tenant="flood"))
    s.add(seq(7, tenant="quiet"))
    s.add(seq(8, tenant="quiet"))
    s.add(seq(9))                                     # the default tenant is one more
    order = [admit_one_per_step(s) for _ in range(9)]
    assert order == [1, 7, 9, 2, 8, 3, 4, 5, 6]


def test_a_higher_priority_goes_before_other_tenants_turns():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=1, clock=Clock())
    s.add(seq(1, tenant="a"))
    s.add(seq(2, tenant="b"))
    s.add(seq(3, tenant="a", priority=1))
    assert [admit_one_per_step(s) for _ in range(3)] == [3, 2, 1]


def test_requests_waiting_too_long_expire_and_the_queue_sheds_meanwhile():
    clock = Clock()
    s = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_queue_wait_s=5.0, clock=clock)
    running = seq(1, max_tokens=50)
    s.add(running)
    s.schedule()                                      # admitted: the only slot is taken
    late, later = seq(2), seq(3)
    s.add(late)
    clock.now = 3.0
    s.add(later)
    assert not s.overloaded and s.expire_waiting() == []
    clock.now = 5.5
    assert s.overloaded                               # late waited 5.5 s > 5 s, not yet expired
    assert s.expire_waiting() == [late]
    assert late.status is SeqStatus.FINISHED and late.finish_reason == "queue_wait"
    assert list(s.waiting) == [later] and s.overloaded          # shedding since the last pass
    assert s.expire_waiting() == [] and not s.overloaded        # later waited 2.5 s
    clock.now = 100.0
    assert s.expire_waiting() == [later] and not s.waiting and not s.overloaded
    assert running.status is SeqStatus.RUNNING


def test_preempted_and_moved_sequences_never_expire_and_preempted_go_first():
    clock = Clock()
    q = WaitingQueue(clock, aging_s=1.0)
    ran = seq(1)
    ran.queued_at, ran.first_admitted_at = 0.0, 1.0   # moved from a failed replica
    q.push(ran)
    clock.now = 50.0
    fresh, preempted = seq(2, priority=100), seq(3)
    q.push(fresh)
    q.push_front(preempted)
    assert len(q) == 3 and ran in q and preempted in q
    assert q.peek() is preempted
    q.pop(preempted)
    assert q.level(ran, clock.now) == 50 and q.peek() is fresh       # 100 > 0 + 50 s / 1 s
    clock.now = 200.0
    assert q.head_wait() == 150.0                    # fresh's: ran was admitted before
    assert q.expire(10.0) == [fresh]                 # ran ran before: it never expires
    assert list(q) == [ran] and q.peek() is ran
    q.remove(ran)
    assert len(q) == 0 and q.peek() is None and q.head_wait() == 0.0


def test_one_pass_of_admissions_orders_as_ordering_afresh_each_time():
    """peek/pop at one `now` reuse the tenants' order; it must equal a fresh one every time."""
    import random
    rng = random.Random(1)
    for _ in range(100):
        clock = Clock()
        aging = rng.choice([0.0, 1.0, 3.0])
        reused, fresh = WaitingQueue(clock, aging), WaitingQueue(clock, aging)
        got, want, n = [], [], 0
        for _ in range(40):
            clock.now += rng.choice([0, 0.5, 1, 2])
            for _ in range(rng.randint(0, 3)):
                n += 1
                kw = dict(tenant=rng.choice("abcd"), priority=rng.choice([0, 0, 1, 2]))
                reused.push(seq(n, **kw))
                fresh.push(seq(n, **kw))
            for _ in range(rng.randint(0, 3)):
                if (a := reused.peek(clock.now)) is None:
                    break
                reused.pop(a, clock.now)
                got.append(a.seq_id)
                fresh._order_at = None            # forget its order: rank every tenant again
                b = fresh.peek(clock.now)
                fresh.pop(b, clock.now)
                want.append(b.seq_id)
        assert got == want
