import asyncio

import pytest

from llmos.kernel.actor import Actor, ActorStopped


class Counter(Actor):
    def __init__(self):
        super().__init__("counter")
        self.seen = []
        self.stopped = False

    async def receive(self, msg):
        if msg == "boom":
            raise ValueError("boom")
        if msg == "slow":
            await asyncio.sleep(0.05)
        self.seen.append(msg)
        return len(self.seen)

    async def on_stop(self):
        self.stopped = True


def run(coro):
    return asyncio.run(coro)


def test_ask_returns_the_handlers_value_and_messages_are_handled_in_order():
    async def main():
        a = Counter().start()
        a.tell("x")
        assert await a.ask("y") == 2
        assert a.seen == ["x", "y"]
        await a.stop()
    run(main())


def test_a_failing_message_fails_only_its_ask_and_the_actor_lives_on():
    async def main():
        a = Counter().start()
        with pytest.raises(ValueError):
            await a.ask("boom")
        a.tell("boom")  # a failed tell is logged, not raised
        assert await a.ask("ok") == 1
        await a.stop()
    run(main())


def test_stopping_fails_every_queued_ask_and_later_messages():
    async def main():
        a = Counter().start()
        first = a.ask("slow")
        queued = [a.ask(i) for i in range(3)]
        stop = asyncio.ensure_future(a.stop())
        await asyncio.sleep(0)
        await stop
        assert await first == 1  # the message in hand finishes
        for q in queued:
            with pytest.raises(ActorStopped):
                await q
        with pytest.raises(ActorStopped):
            await a.ask("late")
        with pytest.raises(ActorStopped):
            a.tell("late")
        assert a.stopped and not a.alive
    run(main())
