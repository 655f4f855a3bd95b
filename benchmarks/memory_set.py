"""A set of long dialogues with planted facts, for ``python -m bot.memory_eval``.

Each dialogue is filler (real exchanges from a corpus of dialogues) with one thing the user
says about themselves planted 20, 60, 200 or 1,000 turns before a question about it. Kinds:

- ``fact``: a fact of a kind the bot keeps (name, age, city, job, pet, likes), in varied
  wording and inflection ("я из Казани", "живу в Казани", "зовут меня Аня");
- ``detail``: something that is not such a fact ("моя сестра Оля работает в банке"), which only
  recall of old exchanges can bring back;
- ``update``: a city stated, then changed ("я переехала в Тверь"): the new value must be there,
  the old one alone is a failure (``wrong``);
- ``other``: the user's name with someone else's right next to it ("а мою подругу зовут Лена"):
  the other person's name alone is a failure;
- ``never``: a question about something never said: whatever memory adds is noise;
- ``ordinary``: no question at all, the next real message of the dialogue after 1,000 turns of
  it: how often the bot recalls an old exchange on an ordinary turn, and how many tokens that
  adds (what memory costs the engine in a conversation, ``make bench``'s ``--recall-every``).

Each line: ``{"id", "turns", "probe", "category", "distance", "answers", "wrong"}`` (the tool
reads the first three; the scorer, ``benchmarks.memory_score``, the rest). Filler exchanges in
which the bot's own rules find a fact are skipped, so that the only facts are the planted ones.
The set is deterministic for a given filler file and seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

DISTANCES = (20, 60, 200, 1000)
DEFAULT_FILLER = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ru_anekdot_dialogues.parquet"
)

NAMES = ["Аня", "Борис", "Светлана", "Дмитрий", "Оксана", "Тимур", "Вера", "Глеб"]
OTHER_NAMES = ["Лена", "Костя", "Марина", "Пётр"]
#: (nominative, prepositional, accusative, genitive) of cities.
CITIES = [
    ("Казань", "Казани", "Казань", "Казани"),
    ("Тверь", "Твери", "Тверь", "Твери"),
    ("Омск", "Омске", "Омск", "Омска"),
    ("Новосибирск", "Новосибирске", "Новосибирск", "Новосибирска"),
    ("Самара", "Самаре", "Самару", "Самары"),
    ("Нижний Новгород", "Нижнем Новгороде", "Нижний Новгород", "Нижнего Новгорода"),
]
#: (nominative, instrumental) of jobs.
JOBS = [("программист", "программистом"), ("врач", "врачом"), ("учитель", "учителем")]
PETS = [("кошка", "кошку", "Мурка"), ("собака", "собаку", "Рекс"), ("попугай", "попугая", "Кеша")]
LIKES = ["шахматы", "горные лыжи", "джаз", "рыбалку"]

FACT_TEMPLATES = {
    "name": (
        ["Меня зовут {name}.", "Кстати, зовут меня {name}!", "Будем знакомы, моё имя {name}."],
        ["Как меня зовут?", "Ты помнишь, как меня зовут?"],
    ),
    "age": (["Мне {age} лет.", "Мне уже {age} лет, представляешь?"], ["Сколько мне лет?"]),
    "city": (
        ["Я живу в {city_prep}.", "Я из {city_gen}, кстати.", "Я сейчас живу в {city_prep}."],
        ["Где я живу?", "Ты помнишь, в каком городе я живу?"],
    ),
    "job": (["Я работаю {job_ins}.", "Я по профессии {job}."], ["Кем я работаю?"]),
    "pet": (
        ["У меня есть {pet} по кличке {pet_name}.", "У меня {pet}, зовут {pet_name}."],
        ["Как зовут моего питомца?"],
    ),
    "likes": (["Я очень люблю {likes}.", "Я обожаю {likes}."], ["Что я люблю?"]),
}
DETAILS = [
    ("Моя сестра Оля работает в банке.", "Где работает моя сестра?", ["банк"], "В банке."),
    (
        "Прошлым летом мы ездили отдыхать в Грузию.",
        "Куда мы ездили отдыхать летом?",
        ["Грузи"],
        "В Грузию.",
    ),
    ("Я недавно купил машину, белую Ладу.", "Какую машину я купил?", ["Лад"], "Белую Ладу."),
    ("Мой любимый фильм — «Брат».", "Какой у меня любимый фильм?", ["Брат"], "«Брат»."),
    (
        "В субботу у меня экзамен по химии.",
        "Какой у меня экзамен в субботу?",
        ["хими"],
        "По химии.",
    ),
    ("Мой брат Саша играет на гитаре.", "На чём играет мой брат?", ["гитар"], "На гитаре."),
]
NEVER = [
    "Как зовут мою собаку?",
    "В каком году я окончил школу?",
    "Какая у меня любимая книга?",
    "Где работает мой отец?",
    "На какой машине я езжу?",
    "Какой у меня любимый цвет?",
]


def filler_exchanges(path: Path | None, seed: int) -> list[tuple[str, str]]:
    """(user, bot) pairs of real dialogue from ``path`` (a parquet with ``sample``), or the
    project's bundled sample dialogues without one; no pair the bot's rules take a fact from."""
    from bot.facts import extract_facts

    dialogues: list[list[str]] = []
    if path is not None and path.exists():
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["sample"])
        dialogues = [d for d in table.column("sample").to_pylist() if d]
    else:
        from dataset_tools.sample_data import generate_dialogues

        dialogues = [list(d) for d in generate_dialogues()]
    pairs = [
        (d[i].strip(), d[i + 1].strip())
        for d in dialogues
        for i in range(0, len(d) - 1, 2)
        if d[i].strip() and d[i + 1].strip() and len(d[i]) < 200 and len(d[i + 1]) < 200
    ]
    pairs = [pair for pair in pairs if not extract_facts(pair[0])]
    random.Random(seed).shuffle(pairs)
    return pairs


class _Filler:
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs, self.at = pairs, 0

    def take(self, count: int) -> list[str]:
        turns: list[str] = []
        for _ in range(count):
            user, bot = self.pairs[self.at % len(self.pairs)]
            self.at += 1
            turns += [user, bot]
        return turns


def _dialogue(
    filler: _Filler, planted: list[tuple[int, str]], distance: int, lead: int = 5
) -> list[str]:
    """Filler turns with each ``(distance_back, statement)`` planted as a user turn that many
    turns before the end (the probe comes right after the last turn)."""
    exchanges = distance // 2 + lead
    turns = filler.take(exchanges)
    for back, statement in planted:
        turns[len(turns) - back] = statement  # an even offset back: a user turn
    return turns


def build(pairs: list[tuple[str, str]], seed: int, per_distance: int) -> Iterator[dict]:
    rng = random.Random(seed)
    filler = _Filler(pairs)
    number = 0

    def item(
        category: str, distance: int, turns: list[str], probe: str, answers, wrong=(), reply=""
    ):
        nonlocal number
        number += 1
        return {
            "id": f"{category}-{distance}-{number}",
            "turns": turns,
            "probe": probe,
            "category": category,
            "distance": distance,
            "answers": list(answers),
            "wrong": list(wrong),
            "answer_text": reply,  # a right reply, whose probability the model is asked for
        }

    for distance in DISTANCES:
        for index in range(per_distance):
            kind = list(FACT_TEMPLATES)[index % len(FACT_TEMPLATES)]
            statements, probes = FACT_TEMPLATES[kind]
            name, (city, city_prep, _, city_gen) = rng.choice(NAMES), rng.choice(CITIES)
            job, job_ins = rng.choice(JOBS)
            pet, _, pet_name = rng.choice(PETS)
            values = {
                "name": name,
                "age": str(rng.randint(18, 70)),
                "city_prep": city_prep,
                "city_gen": city_gen,
                "job": job,
                "job_ins": job_ins,
                "pet": pet,
                "pet_name": pet_name,
                "likes": rng.choice(LIKES),
            }
            answer = {
                "name": [name],
                "age": [values["age"]],
                "city": [city.split()[-1][:4]],
                "job": [job[:5]],
                "pet": [pet_name],
                "likes": [values["likes"].split()[-1][:4]],
            }[kind]
            statement = rng.choice(statements).format(**values)
            turns = _dialogue(filler, [(distance, statement)], distance)
            reply = {
                "name": f"Тебя зовут {name}.",
                "age": f"Тебе {values['age']}.",
                "city": f"Ты живёшь в городе {city}.",
                "job": f"Ты {job}.",
                "pet": f"Твоего питомца зовут {pet_name}.",
                "likes": f"Ты любишь {values['likes']}.",
            }[kind]
            yield item("fact", distance, turns, rng.choice(probes), answer, reply=reply)
        for index in range(max(1, per_distance // 3)):
            said, probe, answers, reply = DETAILS[(index + distance) % len(DETAILS)]
            turns = _dialogue(filler, [(distance, said)], distance)
            yield item("detail", distance, turns, probe, answers, reply=reply)
        for _ in range(max(1, per_distance // 3)):
            (old, old_prep, _, _), (new, _, new_acc, _) = rng.sample(CITIES, 2)
            planted = [
                (distance + 10, f"Я живу в {old_prep}."),
                (distance, f"Я переехала в {new_acc}."),
            ]
            turns = _dialogue(filler, planted, distance + 10)
            answers, wrong = [new.split()[-1][:4]], [old.split()[-1][:4]]
            reply = f"Ты живёшь в городе {new}."
            yield item("update", distance, turns, "Где я живу?", answers, wrong, reply)
        for _ in range(max(1, per_distance // 3)):
            name, other = rng.choice(NAMES), rng.choice(OTHER_NAMES)
            planted = [
                (distance, f"Меня зовут {name}."),
                (distance - 2, f"А мою подругу зовут {other}."),
            ]
            turns = _dialogue(filler, planted, distance)
            reply = f"Тебя зовут {name}."
            yield item("other", distance, turns, "Как меня зовут?", [name], [other], reply)
    for index in range(per_distance):
        turns = _dialogue(filler, [], 200)
        yield item("never", 200, turns, NEVER[index % len(NEVER)], [])
    for _ in range(per_distance):
        turns = _dialogue(filler, [], 1000)
        yield item("ordinary", 1000, turns, filler.take(1)[0], [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_set", description=__doc__)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--filler",
        type=Path,
        default=DEFAULT_FILLER,
        help="parquet of real dialogues ('sample' column); default ../shared/data's anekdot "
        "corpus, or the bundled sample dialogues where that is absent",
    )
    parser.add_argument("--per-distance", type=int, default=12, help="fact dialogues a distance")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pairs = filler_exchanges(args.filler, args.seed)
    count = 0
    with args.output.open("w", encoding="utf-8") as out:
        for item in build(pairs, args.seed, args.per_distance):
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
            count += 1
    source = args.filler if args.filler.exists() else "the bundled sample dialogues"
    print(f"{count} dialogues written to {args.output} (filler: {source}, {len(pairs)} exchanges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
