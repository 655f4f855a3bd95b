"""The remote backend against the real `python -m bot serve`, and against a small in-test HTTP
server for the shapes a real server shows only when it breaks (an error inside the stream)."""

import asyncio
import json

import pytest
from aiohttp import web
from openai import AsyncOpenAI
from transformers import AutoTokenizer

from bot.engine import EngineBusy, SamplingParams
from bot.engine.remote import RemoteBackend, RemoteError
from tests.bot.conftest import SERVER_KEYS, SERVER_PERSONA
from tests.bot.model_server import fill_queue, free_port, release


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def connect(model_server, tiny_model_dir, **overrides) -> RemoteBackend:
    settings = {
        "api_key": SERVER_KEYS[0],
        "model": None,
        "tokenizer_path": str(tiny_model_dir),
        "persona": SERVER_PERSONA,
        "context_tokens": None,
        "reply_tokens": 16,
        "timeout_s": 60,
        "connect_timeout_s": 2,
    }
    return await RemoteBackend.connect(model_server.base_url, **(settings | overrides))


async def test_a_reply_streams_and_the_next_turn_is_served_from_the_cache(
    model_server, tiny_model_dir
):
    backend = await connect(model_server, tiny_model_dir)
    try:
        assert backend.model == "long-model" and backend.context_tokens == 8192
        shown: list[str] = []
        params = SamplingParams(max_new_tokens=16, min_new_tokens=16)
        first = await backend.generate(["Привет!"], params, key=7, on_text=shown.append)
        assert first and shown and shown[-1] == first
        await backend.generate(["Привет!", first, "Как дела?"], params, key=7)
        assert backend.reused_tokens > backend.prefilled_tokens  # the first turn was reused
        assert backend.replies == 2 and backend.tokens == 32
    finally:
        await backend.aclose()


async def test_a_prompt_too_long_for_the_server_is_trimmed_once(
    model_server, tiny_model_dir, caplog
):
    """The bot believes in a window larger than the server's: the server's 400 says so, and the
    history is trimmed to three quarters and sent again."""
    backend = await connect(model_server, tiny_model_dir, context_tokens=40_000)
    try:
        exchange = ["Расскажи что-нибудь длинное про книги и фильмы. " * 20, "Хорошо. " * 20]
        turns = exchange * 16 + ["А что ещё?"]
        assert 8192 < backend.count_tokens(" ".join(turns)) < 10_000
        reply = await backend.generate(turns, SamplingParams(max_new_tokens=8))
        assert isinstance(reply, str)
        assert backend.replies == 1
        assert "the server found the prompt too long" in caplog.text
    finally:
        await backend.aclose()


async def test_a_full_server_and_no_server_are_busy(model_server, tiny_model_dir):
    backend = await connect(model_server, tiny_model_dir)
    async with AsyncOpenAI(
        base_url=model_server.base_url, api_key=SERVER_KEYS[1], max_retries=0
    ) as client:
        streams = await fill_queue(client, model_server)
        try:
            with pytest.raises(EngineBusy):  # 429, retried once after Retry-After, 429 again
                await backend.generate(["Привет!"], SamplingParams(max_new_tokens=4))
        finally:
            await release(streams, model_server)
            await backend.aclose()

    nobody = RemoteBackend(
        AsyncOpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="x", max_retries=0),
        "long-model",
        backend.tokenizer,
        persona=None,
        context_tokens=1024,
    )
    with pytest.raises(EngineBusy):
        await nobody.generate(["Привет!"], SamplingParams(max_new_tokens=4))
    await nobody.aclose()


async def test_every_sampling_value_is_sent_and_an_error_mid_stream_is_raised(tokenizer):
    """vLLM fills any field a request leaves out from its own defaults: nothing is left out.
    An error event after the first chunk is the apology's case, not a retry."""
    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
        chunk["choices"] = [{"index": 0, "text": " Приве", "finish_reason": None}]
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        error = {"error": {"message": "the engine died", "type": "InternalServerError"}}
        await response.write(f"data: {json.dumps(error)}\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    backend = RemoteBackend(
        AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=1),
        "m",
        tokenizer,
        persona=SERVER_PERSONA,
        context_tokens=1024,
        reply_tokens=50,
    )
    shown: list[str] = []
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2)
    try:
        with pytest.raises(RemoteError, match="the engine died"):
            await backend.generate(["Привет!"], params, key=5, on_text=shown.append)
    finally:
        await backend.aclose()
        await runner.cleanup()
    assert shown == ["Приве"]
    assert len(bodies) == 1  # streaming had begun: never asked twice
    sent = bodies[0]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.7 and sent["top_p"] == 0.9
    assert sent["top_k"] == 40 and sent["repetition_penalty"] == 1.2
    assert sent["min_tokens"] == 0 and sent["stream"] is True and sent["user"] == "5"
    assert set(sent["stop"]) == {"@@ПЕРВЫЙ@@", "@@ВТОРОЙ@@"}
    assert tokenizer.eos_token_id in sent["stop_token_ids"]
    assert sent["prompt"].startswith("@@ПЕРВЫЙ@@") or SERVER_PERSONA in sent["prompt"]
    assert asyncio.get_running_loop().is_running()
