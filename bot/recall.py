"""Finding a user's old exchanges again: which of them the new message is about.

The window holds the latest turns only; what a user said 200 or 1,000 turns ago is in the
database but not in the prompt. Each user message is indexed under its content words
(:func:`bot.morphology.content_lemmas`, so "в банке" finds "банк"), and a new message recalls
the few older exchanges that share its rarest words, scored like a search engine scores
documents (inverse document frequency, over this user's messages only):

- a word in many of the user's messages ("привет") weighs little, a rare one ("Мурка") much;
- a message is recalled only when it covers at least :data:`MIN_COVERAGE` of the new
  message's weight: words the user never used before count against it, so a question about
  something never said recalls nothing rather than whatever shares one common word;
- at most :data:`MAX_RECALLED` exchanges, the best first, within ``MEMORY_TOKENS``.

Why not embeddings: a sentence-embedding model beside a 355M generator on a 2-core CPU costs
more than the generator's own step, and the users of bots with vector memory report irrelevant
recalls; exact words with their weights are cheap, explainable and measured
(``python -m bot.memory_eval``).
"""

from __future__ import annotations

import math
from collections.abc import Collection

from bot.db.repository import TermHits

#: The share of the new message's word weight an old message must hold to be recalled.
MIN_COVERAGE = 0.5
#: At most this many exchanges recalled into one prompt.
MAX_RECALLED = 3
#: Candidates looked at (the best ones), of which those already in the window are passed over.
CANDIDATES = 20


def ranked(query: Collection[str], hits: TermHits) -> list[tuple[int, float]]:
    """The messages of ``hits`` worth recalling for a message with words ``query``, best first
    (ties: the newer first), each with its coverage of the query's weight; at most
    :data:`CANDIDATES`."""
    if not query or not hits.hits:
        return []
    total = hits.indexed

    def weight(term: str) -> float:
        return math.log((total + 1) / (hits.df.get(term, 0) + 0.5))

    mass = sum(weight(term) for term in query)
    if mass <= 0:
        return []
    wanted = set(query)
    scored = [
        (message_id, sum(weight(term) for term in terms & wanted) / mass)
        for message_id, terms in hits.hits.items()
    ]
    good = [(message_id, score) for message_id, score in scored if score >= MIN_COVERAGE]
    return sorted(good, key=lambda item: (-item[1], -item[0]))[:CANDIDATES]
