"""sm90_cluster's score exchange as a model, run under random schedules on the CPU.

The kernel (csrc/projected/projected_attention_sm90_kernel.cuh, ``exchange``) sums four partial
score tiles each key tile: the two consumer warpgroups of a CTA add each other's partial through
two shared-memory slots, ordered by named barriers (``bar.sync 3`` between the writes and the
reads; the reader's ``bar.arrive`` and the writer's ``bar.sync`` on the writer's slot-free barrier
before the next write); then each consumer sends half of its CTA's sum to the other CTA with
``st.async`` into receive buffer ``n % 2``, whose bytes complete on that CTA's ``s_full[n % 2]``
(one ``arrive.expect_tx`` there, by consumer 0), and waits on its own ``s_full`` with parity
``(n // 2) & 1``. No barrier marks a receive buffer free.

Here each consumer is one agent (a thread and its partner at the same offset in the other
consumer: the only threads whose data meet), the named barriers and mbarriers follow PTX's rules,
each ``st.async`` lands at a random later moment, and every read must see the value of its own
exchange: a read that races a write (in either order) sees another exchange's value. This checks
the protocol, not the hardware; compute-sanitizer's racecheck is the check on the GPU
(docs/performance.md, twelfth round, for what it reports)."""

import random

import pytest


class NamedBarrier:
    """``bar.sync`` / ``bar.arrive`` with an expected count of 2 agents."""

    def __init__(self):
        self.arrived, self.generation = 0, 0

    def arrive(self) -> int:
        """Arrives; the generation this arrival belongs to."""
        generation = self.generation
        self.arrived += 1
        if self.arrived == 2:
            self.arrived, self.generation = 0, self.generation + 1
        return generation


class MBarrier:
    """One expected arrival per phase plus a transaction count, which may go below zero when bytes
    land before the ``expect_tx`` (PTX allows it: the phase completes when both reach zero)."""

    def __init__(self):
        self.phase, self.pending, self.tx = 0, 1, 0

    def _complete_if_done(self):
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, 1

    def arrive_expect_tx(self, units: int):
        self.pending -= 1
        self.tx += units
        self._complete_if_done()

    def complete_tx(self, units: int):
        self.tx -= units
        self._complete_if_done()

    def passed(self, parity: int) -> bool:
        """``try_wait.parity``: the phase of this parity has completed."""
        return self.phase % 2 != parity


def run_exchanges(count: int, seed: int, *, slot_free_barrier=True, receive_buffers=2) -> None:
    """Runs ``count`` exchanges in one cluster under a random schedule; raises AssertionError when
    a read sees another exchange's value or the agents deadlock."""
    rng = random.Random(seed)
    slots = [[None, None] for _ in range(2)]  # [cta][consumer]: partial-score slots
    receive = [[[None, None] for _ in range(receive_buffers)] for _ in range(2)]  # [cta][buf][half]
    partials = [NamedBarrier() for _ in range(2)]  # barrier 3, per CTA
    slot_free = [[NamedBarrier(), NamedBarrier()] for _ in range(2)]  # barrier 4 + w, per CTA
    s_full = [[MBarrier() for _ in range(receive_buffers)] for _ in range(2)]
    in_flight = []  # st.async writes not landed yet: (cta, buffer, half, value)

    def sync(barrier):
        generation = barrier.arrive()
        while barrier.generation == generation:
            yield

    def consumer(cta: int, c: int):
        for n in range(count):
            if n > 0 and slot_free_barrier:
                yield from sync(slot_free[cta][c])  # the other consumer read partial n - 1
            slots[cta][c] = n
            yield
            yield from sync(partials[cta])
            assert slots[cta][c ^ 1] == n, f"cta {cta} consumer {c} exchange {n}: partial"
            yield
            if n + 1 < count and slot_free_barrier:
                slot_free[cta][c ^ 1].arrive()
            b = n % receive_buffers
            if c == 0:
                s_full[cta][b].arrive_expect_tx(2)  # both halves of the other CTA's sum
            yield
            in_flight.append((cta ^ 1, b, c, n))
            yield
            parity = (n // receive_buffers) & 1
            while not s_full[cta][b].passed(parity):
                yield
            got = receive[cta][b]
            assert got == [n, n], f"cta {cta} consumer {c} exchange {n}: received {got}"
            yield

    agents = [consumer(cta, c) for cta in range(2) for c in range(2)]
    steps = 0
    while agents or in_flight:
        steps += 1
        assert steps < 100_000, "deadlock: every agent waits"
        if in_flight and (not agents or rng.random() < 0.3):
            cta, b, half, value = in_flight.pop(rng.randrange(len(in_flight)))
            receive[cta][b][half] = value
            s_full[cta][b].complete_tx(1)
            continue
        agent = rng.choice(agents)
        try:
            next(agent)
        except StopIteration:
            agents.remove(agent)


@pytest.mark.parametrize("count", range(8))
def test_every_read_sees_its_own_exchange(count):
    for seed in range(200):
        run_exchanges(count, seed)


def _failing_schedules(**broken) -> int:
    """Of 200 random schedules of 5 exchanges with a part of the protocol ``broken``, how many a
    read or a deadlock catches."""
    caught = 0
    for seed in range(200):
        try:
            run_exchanges(5, seed, **broken)
        except AssertionError:
            caught += 1
    return caught


def test_the_model_catches_a_missing_slot_free_barrier():
    """Without the slot-free barrier a fast consumer overwrites its partial before the other read
    it: some schedule shows it, so the test above can fail."""
    assert _failing_schedules(slot_free_barrier=False) > 0


def test_the_model_catches_a_single_receive_buffer():
    """With one receive buffer, the other CTA's next sum can land before this CTA read the last."""
    assert _failing_schedules(receive_buffers=1) > 0
