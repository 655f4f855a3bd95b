"""Shared fixtures: a tiny GPT-2 and tokenizer built locally (random weights, BPE on our sample)."""

from pathlib import Path

import pytest
import torch

from dataset_tools.dialogue_format import parse_reply, render_dialogue, render_prompt
from dataset_tools.sample_data import generate_dialogues
from models.scratch_tokenizer import train_scratch_tokenizer
from trainer.modeling import build_scratch_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model directory any loader accepts, made in a second, offline."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_scratch_tokenizer((render_dialogue(d) for d in generate_dialogues()), 600)
    torch.manual_seed(0)  # the same random weights in every run: a failure can be reproduced
    model = build_scratch_model(
        tokenizer, {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024}
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: What ``chatty_model_dir`` learned by heart, with and without a persona.
CHATTY_DIALOGUES = [
    ["Привет!", "Привет, как дела?", "Хорошо, а у тебя?", "Отлично, спасибо."],
    ["Как дела?", "Хорошо, спасибо.", "Что делаешь?", "Читаю книгу."],
]
CHATTY_PERSONA = "Я бот."


@pytest.fixture(scope="session")
def chatty_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model taught two dialogues by heart (a second or two of training), so that its
    replies are clean text, as a trained model's are: streaming shows words, and a reply's tokens
    can be reused from the cache on the next turn.

    Training goes on until greedy decoding gives every learned reply back (checked with
    ``model.generate``): a fixed 100 epochs left some random starting weights short of it (about
    1 run in 20 answered "Привет, спасибо." to "Привет!"), and the tests built on it failed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("chatty-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [render_dialogue(d, p) for d in CHATTY_DIALOGUES for p in (CHATTY_PERSONA, None)]
    batch = [torch.tensor(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]) for t in texts]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for attempt in range(7):  # 100 epochs, then 50 more at a time, up to 400
        model.train()
        for _ in range(100 if attempt == 0 else 50):
            for ids in batch:
                mask = torch.ones_like(ids[None])
                model(ids[None], attention_mask=mask, labels=ids[None]).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        model.eval()
        wrong = _unlearned_replies(model, tokenizer)
        if not wrong:
            break
    else:
        raise RuntimeError(f"the chatty model did not learn its dialogues: {wrong}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _unlearned_replies(model, tokenizer) -> list[tuple[str, str]]:
    """(expected, greedy) for each reply of ``CHATTY_DIALOGUES`` the model does not give back."""
    wrong = []
    for dialogue in CHATTY_DIALOGUES:
        for persona in (CHATTY_PERSONA, None):
            for end in range(1, len(dialogue), 2):
                prompt = render_prompt(dialogue[:end], persona)
                ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
                with torch.inference_mode():
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,
                        max_new_tokens=30,
                        pad_token_id=tokenizer.eos_token_id,
                    )
                text = tokenizer.decode(out[0, ids.shape[1] :])
                reply = parse_reply(text, eos_token=tokenizer.eos_token)
                if reply != dialogue[end]:
                    wrong.append((dialogue[end], reply))
    return wrong


@pytest.fixture
def redis_url():
    """A real redis-server of the test's own (skipped, saying why, where it is not installed)."""
    from tests.servers import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL cluster for the session; each test takes a database of its own."""
    from tests.servers import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    return postgres_server.new_database()
