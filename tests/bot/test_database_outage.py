"""The database restarting under the bot (a real PostgreSQL taken down and started again)."""

import asyncio
import time

from bot.dialogue import UserRef
from tests.bot.recording_session import in_process_bot


async def test_a_delivered_reply_is_stored_once_the_database_is_back(
    postgres_server, tiny_model_dir
):
    """The user has the reply when PostgreSQL goes down for longer than the ordinary write
    retries (about 7 s): storing it goes on trying and succeeds once the server is back. It
    used to give up, the message stayed owed and was answered again (the user saw a second
    reply, seen beside busy processes in the replicas' PostgreSQL test)."""
    url = postgres_server.new_database()
    dp, _bot, _session, db = await in_process_bot(url, tiny_model_dir)
    dialogue = dp["dialogue"]
    user = UserRef(7002, "Аня")
    try:
        message_id = await dialogue.remember_user_message(user, "Привет!", 101)
        await asyncio.to_thread(postgres_server.go_down)

        async def back_after(seconds: float) -> None:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(postgres_server.start)

        comeback = asyncio.create_task(back_after(10))
        started = time.monotonic()
        assert await asyncio.wait_for(dialogue.store_reply(user, "Ответ", message_id), 90)
        assert time.monotonic() - started >= 10
        await comeback
        assert await dialogue.unanswered(600) == []
    finally:
        if postgres_server.process.poll() is not None:
            postgres_server.start()
        dialogue.backend.close()
        await db.dispose()
