"""`python -m bot serve` as its clients see it: the official `openai` package against the real
server process on 127.0.0.1 (a tiny random model with an 8192-token window)."""

import asyncio
import dataclasses
import json
import os
import urllib.error
import urllib.request

import openai
import pytest
from openai import AsyncOpenAI
from transformers import AutoModelForCausalLM

from bot.engine import GenerationEngine, SamplingParams, load_model
from tests.bot.conftest import SERVER_KEYS, SERVER_PERSONA
from tests.bot.model_server import fill_queue, release

GREEDY = {"temperature": 0, "top_p": 1.0, "extra_body": {"repetition_penalty": 1.0}}
LOCAL_GREEDY = SamplingParams(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@pytest.fixture
async def client(model_server):
    async with AsyncOpenAI(
        base_url=model_server.base_url, api_key=SERVER_KEYS[1], max_retries=0, timeout=120
    ) as client:
        yield client


@pytest.fixture
async def local_engine(long_model_dir):
    """The same model in this process, with the server's persona: the reference."""
    model, tokenizer = load_model(str(long_model_dir))
    engine = GenerationEngine(model, tokenizer, persona=SERVER_PERSONA, reply_tokens=64)
    engine.start()
    yield engine
    engine.close()


def raw_post(server, path: str, body: bytes, key: str | None = SERVER_KEYS[0]):
    """(status, headers, JSON) of a POST that the `openai` client would not send."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.root_url + path, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


async def test_greedy_completions_equal_the_in_process_engine(client, local_engine, model_server):
    prompt = "Привет! Как дела?"
    expected = await local_engine.complete(
        prompt, dataclasses.replace(LOCAL_GREEDY, max_new_tokens=24)
    )
    done = await client.completions.create(
        model="long-model", prompt=prompt, max_tokens=24, **GREEDY
    )
    assert done.choices[0].text == expected.text
    assert done.choices[0].finish_reason == expected.finish_reason
    assert done.usage.prompt_tokens == expected.prompt_tokens
    assert done.usage.completion_tokens == len(expected.token_ids)

    # the same prompt as token ids, and streamed: the same text, in pieces
    ids = local_engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stream = await client.completions.create(
        model="long-model",
        prompt=ids,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [chunk async for chunk in stream]
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


async def test_chat_completions_render_the_dialogue_format(client, local_engine):
    params = dataclasses.replace(LOCAL_GREEDY, max_new_tokens=30)
    expected = await local_engine.generate(["Привет!", "Здравствуй.", "Что делаешь?"], params)
    messages = [
        {"role": "user", "content": "Привет!"},
        {"role": "assistant", "content": "Здравствуй."},
        {"role": "user", "content": "Что делаешь?"},
    ]
    done = await client.chat.completions.create(
        model="long-model", messages=messages, max_tokens=30, **GREEDY
    )
    assert done.choices[0].message.content == expected
    assert done.choices[0].message.role == "assistant"

    stream = await client.chat.completions.create(
        model="long-model", messages=messages, max_tokens=30, stream=True, **GREEDY
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    # a system message is the persona: another prompt, so (almost surely) another reply
    other = await client.chat.completions.create(
        model="long-model",
        messages=[{"role": "system", "content": "Ты пират."}, *messages],
        max_tokens=30,
        **GREEDY,
    )
    assert other.usage.prompt_tokens != done.usage.prompt_tokens


async def test_stop_strings_seed_and_stop_token_ids(client, local_engine):
    long = await client.completions.create(
        model="long-model", prompt="Привет", max_tokens=40, **GREEDY
    )
    text = long.choices[0].text
    stop = text[10:13]
    cut = await client.completions.create(
        model="long-model", prompt="Привет", max_tokens=40, stop=[stop], **GREEDY
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop

    stream = await client.completions.create(
        model="long-model", prompt="Привет", max_tokens=40, stop=[stop], stream=True, **GREEDY
    )
    streamed = "".join([c.choices[0].text async for c in stream if c.choices])
    assert streamed == cut.choices[0].text  # a partial stop string was never sent

    sampled = {
        "model": "long-model",
        "prompt": "Привет",
        "max_tokens": 20,
        "temperature": 1.0,
        "seed": 1234,
    }
    first = await client.completions.create(**sampled)
    again = await client.completions.create(**sampled)
    assert first.choices[0].text == again.choices[0].text

    # stop_token_ids: a token of the greedy reply ends it there, and is not in the text
    reference = await local_engine.complete(
        "Привет", dataclasses.replace(LOCAL_GREEDY, max_new_tokens=40)
    )
    token = reference.token_ids[6]
    at = reference.token_ids.index(token)
    ended = await client.completions.create(
        model="long-model",
        prompt="Привет",
        max_tokens=40,
        temperature=0,
        top_p=1.0,
        extra_body={"repetition_penalty": 1.0, "stop_token_ids": [token]},
    )
    expected = local_engine.tokenizer.decode(reference.token_ids[:at])
    assert ended.choices[0].text == expected
    assert ended.choices[0].finish_reason == "stop"
    assert ended.choices[0].model_extra["stop_reason"] == token


async def test_prefix_cache_across_requests(client, model_server):
    prompt = "Привет! Расскажи что-нибудь интересное про книги и фильмы."
    first = await client.completions.create(
        model="long-model", prompt=prompt, max_tokens=20, user="dialogue-1", **GREEDY
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    following = prompt + first.choices[0].text + " А ещё?"
    second = await client.completions.create(
        model="long-model", prompt=following, max_tokens=20, user="dialogue-1", **GREEDY
    )
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert reused >= first.usage.prompt_tokens + 20 - 1  # the whole previous turn

    # a client that names no dialogue: found by the text its prompt extends
    third = following + second.choices[0].text + " Понятно."
    anonymous = await client.completions.create(
        model="long-model", prompt=third, max_tokens=5, **GREEDY
    )
    assert anonymous.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens


async def test_models_tokenize_health_and_metrics(client, model_server, long_model_dir):
    models = await client.models.list()
    card = models.data[0]
    assert card.id == "long-model"
    assert card.model_extra["max_model_len"] == 8192
    assert card.model_extra["dtype"] == "float32"
    assert card.model_extra["quantization"] == "none"
    # The served model's projections are packed for oneDNN (not nn.Parameters any more) and its
    # lm_head is a copy of the input embedding: neither may change the count (once undercounted).
    expected = AutoModelForCausalLM.from_pretrained(long_model_dir).num_parameters()
    assert card.model_extra["parameters"] == expected

    status, _, body = raw_post(model_server, "/tokenize", json.dumps({"prompt": "Привет"}).encode())
    assert status == 200 and body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == 8192
    assert model_server.health() == 200
    assert model_server.metric("server_generation_tokens_total") > 0
    assert 1 <= model_server.metric("server_engine_threads") <= (os.cpu_count() or 1)
    assert model_server.metric("server_engine_openmp_stalls") >= 0  # exported (see test_openmp)


async def test_every_error_has_its_status(client, model_server):
    status, _, body = raw_post(model_server, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]

    with pytest.raises(openai.BadRequestError, match="temperature must be"):
        await client.completions.create(model="long-model", prompt="a", temperature=7)
    with pytest.raises(openai.BadRequestError, match="top_k must be an integer"):
        await client.completions.create(
            model="long-model", prompt="a", extra_body={"top_k": "many"}
        )
    with pytest.raises(openai.BadRequestError, match="the last message must be the user's"):
        await client.chat.completions.create(
            model="long-model", messages=[{"role": "assistant", "content": "Привет"}]
        )
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192 tokens"):
        await client.completions.create(model="long-model", prompt="Привет", max_tokens=8192)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client.completions.create(model="gpt-4", prompt="Привет")

    async with AsyncOpenAI(
        base_url=model_server.base_url, api_key="wrong", max_retries=0
    ) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.completions.create(model="long-model", prompt="Привет")
    status, _, _ = raw_post(model_server, "/v1/completions", b'{"prompt": "a"}', key=None)
    assert status == 401


async def test_full_queue_is_429_and_a_client_that_leaves_frees_its_row(client, model_server):
    """Two rows decode 8000 tokens each and one request waits: the next one is refused at once
    with Retry-After. Then the clients go away mid-stream, and their rows go with them long
    before 8000 tokens each."""
    generated_before = model_server.metric("server_generation_tokens_total")
    streams = await fill_queue(client, model_server)
    assert model_server.metric("server_running_rows") == 2
    body = json.dumps({"prompt": "Привет", "max_tokens": 5}).encode()
    status, headers, refused = await asyncio.to_thread(
        raw_post, model_server, "/v1/completions", body
    )
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert "busy" in refused["error"]["message"]

    await release(streams, model_server)
    generated = model_server.metric("server_generation_tokens_total") - generated_before
    assert generated < 3 * 8000
