"""One user's line: messages are answered in the order they arrived, whatever each one does."""

import asyncio

from bot.dialogue import UserRef, _TurnQueues

ALICE = UserRef(1001, "Alice")


async def test_a_turn_that_ends_early_does_not_let_the_next_one_overtake():
    """The stress run's race: a re-delivered update (or a sticker) ends its turn at once; the
    message after it must still wait until the one before it is answered."""
    queues = _TurnQueues()
    first = queues.take(ALICE.telegram_id)  # being answered
    duplicate = queues.take(ALICE.telegram_id)  # already stored: nothing to answer
    later = queues.take(ALICE.telegram_id)
    duplicate.finish()
    waiting = asyncio.ensure_future(later.wait_to_answer())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the first message is not answered yet
    first.finish()
    await asyncio.wait_for(waiting, 5)


async def test_turns_of_other_users_do_not_wait():
    queues = _TurnQueues()
    queues.take(1)
    other = queues.take(2)
    await asyncio.wait_for(other.wait_to_answer(), 5)
