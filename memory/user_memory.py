"""Long-term user memory: the facts each user states or implies about themselves (``memory.facts``), kept per user
in a LangGraph ``BaseStore`` with an embedding index, for recall by meaning.

Layout: one item per fact under the namespace ``("users", <user>, "facts")``; the key is the fact's kind for
single-valued kinds (``gpu``, ``language``, ``usual_dataset`` …: a newer statement replaces the older one) and
``note-<hash>`` for free-form notes. The value is everything that is kept — ``kind``, ``data`` (structured),
``said`` (the user's own words), ``lang`` and ``index_text`` (what is embedded) — and ``show`` returns exactly that.
``forget`` deletes for real: on SQLite the rows are zeroed in the file and the WAL is truncated (see
:mod:`memory.store_db`).

The store is the one :meth:`UserMemory.open` makes (SQLite ``$STACKWISE_HOME/memory.sqlite``, or Postgres at
``STACKWISE_DATABASE_URL``), or any ``BaseStore`` — LangGraph's ``InMemoryStore`` in a notebook, the platform's
store under ``langgraph dev``.

Example:
    >>> from langgraph.store.memory import InMemoryStore
    >>> memory = UserMemory(InMemoryStore())
    >>> [f["key"] for f in memory.learn("ada", "my GPU is an RTX 3060 12G, and answer in Chinese")]
    ['gpu', 'language']
    >>> memory.profile("ada")["gpu"]
    {'name': 'RTX 3060', 'memory_gb': 12.0, 'memory_assumed': False}
    >>> memory.forget("ada", "gpu"), [f["key"] for f in memory.show("ada")]
    (1, ['language'])
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from langgraph.store.base import BaseStore

from memory import fact_text
from memory.facts import KINDS, SINGLE, Fact, extract_facts, remembered
from memory.intents import kinds_in, memory_intent

ROOT, FACTS = "users", "facts"
MAX_NOTES = 200
MAX_FACT_CHARS = 1000
RECALL_MIN = 0.42        # below this score a fact is not what the question asks about
RECALL_SURE = 0.55       # at or above it, memory answers even when the router saw a tool request
FORGET_MIN, FORGET_MARGIN = 0.3, 0.1   # "forget my project": the best fact if it matches clearly
KIND_HINT = 0.25         # a question naming a fact's kind ("what GPU …") lifts facts of that kind
WORD_HINT = 0.08         # each content word the question shares with the user's own words (at most two count)
_STOP = frozenset(re.split(r"\s+", """
    a an the my mine me i i'm i've you your what which who whom where when why how do does did is are am was were be
    have has had use uses used using with about that this it its to of in on for at and or remember told tell say said
    know please can could would should will our we us 我的 什么 是什么 哪里 哪个 我们 你的 记得 告诉 一下 是哪 用什
    """.strip()))
_LIST_LIMIT = MAX_NOTES + len(SINGLE) + 10


class UserMemoryError(ValueError):
    """A request the memory refuses (too many notes, an unknown key); the message says what to do."""


def user_namespace(user_id: str) -> tuple[str, str, str]:
    """The namespace of ``user_id``'s facts; the id is %-escaped so ``.`` (LangGraph's separator), ``%`` and control
    characters cannot make two users share one.

    Example:
        >>> user_namespace("ada.lovelace@example.org")
        ('users', 'ada%2Elovelace@example%2Eorg', 'facts')
    """
    label = "".join(f"%{ord(ch):02X}" if ch in ".%" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in user_id)
    return ROOT, label or "%00", FACTS


class UserMemory:
    """Facts per user over a ``BaseStore``: learn, remember, show, forget, recall, profile."""

    def __init__(self, store: BaseStore, *, owns_store: bool = False):
        self.store = store
        self._owns_store = owns_store

    @classmethod
    def open(cls, home: Path, database_url: str | None, embedder: Any) -> UserMemory:
        """The memory the settings name: Postgres at ``database_url`` when set, else ``home/memory.sqlite``;
        facts are indexed with ``embedder`` (``name``, ``dim``, ``embed(texts)``), loaded on first use."""
        from memory.sql_store import SqlStore

        index = {"dims": embedder.dim, "embed": embedder.embed, "fields": ["index_text"]}
        location = database_url.strip() if database_url and database_url.strip() else Path(home) / "memory.sqlite"
        return cls(SqlStore(location, index=index), owns_store=True)

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    # --- writing -----------------------------------------------------------------------------
    def learn(self, user_id: str, text: str, *, lang: str = "en") -> list[dict]:
        """Keep the facts ``text`` states about its writer (nothing for questions); returns what was kept."""
        return self.keep(user_id, extract_facts(text), lang=lang)

    def remember(self, user_id: str, text: str, *, lang: str | None = None) -> list[dict]:
        """The explicit command: keep the structured facts in ``text``, else ``text`` as a note."""
        text = " ".join(str(text).split())
        if not text:
            raise UserMemoryError("There is nothing to remember: the text is empty.")
        if len(text) > MAX_FACT_CHARS:
            raise UserMemoryError(f"That is {len(text):,} characters; I keep notes of up to {MAX_FACT_CHARS:,}. "
                              "Put long text in a file and add it to your knowledge base instead.")
        facts = extract_facts(text) or remembered(text)
        return self.keep(user_id, facts, lang=lang or _lang_of(text))

    def keep(self, user_id: str, facts: list[Fact], *, lang: str = "en") -> list[dict]:
        ns = user_namespace(user_id)
        kept = []
        for fact in facts:
            if fact.kind not in KINDS:
                raise UserMemoryError(f"Unknown kind of fact {fact.kind!r}.")
            if fact.kind == "language" and fact.data.get("lang") == "auto":
                self.store.delete(ns, "language")       # "answer in the language I write in": no preference
                continue
            said = fact.said[:MAX_FACT_CHARS]
            key = fact.kind if fact.kind in SINGLE else "note-" + hashlib.sha1(
                said.casefold().encode()).hexdigest()[:10]
            if fact.kind == "note" and self.store.get(ns, key) is None and self._count_notes(ns) >= MAX_NOTES:
                raise UserMemoryError(f"You have {MAX_NOTES} notes, the most I keep. Delete some first (/memory lists "
                                  "them, /forget KEY deletes one).")
            value = {"kind": fact.kind, "data": fact.data, "said": said, "lang": _lang_of(said) or lang,
                     "index_text": fact_text.index_text(fact.kind, fact.data, said)}
            self.store.put(ns, key, value)
            kept.append({"key": key, **value})
        return kept

    def forget(self, user_id: str, key: str | None = None) -> int:
        """Delete one fact (its key: ``gpu``, ``note-…``) or, with ``key=None``, all of them; the number deleted."""
        ns = user_namespace(user_id)
        if key is None:
            keys = [item.key for item in self.store.search(ns, limit=_LIST_LIMIT)]
        else:
            keys = [key] if self.store.get(ns, key) is not None else []
        for k in keys:
            self.store.delete(ns, k)
        return len(keys)

    def forget_matching(self, user_id: str, words: str) -> tuple[int, str | None]:
        """``forget`` from a request in words: a kind ("my GPU") or the note that best matches ("the cluster")."""
        kinds = [k for k in kinds_in(words) if k != "note"]
        if len(kinds) == 1:
            return self.forget(user_id, kinds[0]), kinds[0]
        hits = self.recall(user_id, words, k=2)
        # The user asked to forget something: the fact that clearly matches best (ahead of the next by FORGET_MARGIN).
        clear = hits and hits[0]["score"] >= FORGET_MIN and (len(hits) == 1 or
                                                             hits[0]["score"] - hits[1]["score"] >= FORGET_MARGIN)
        if not clear:
            return 0, None
        return self.forget(user_id, hits[0]["key"]), hits[0]["kind"]

    def read_message(self, user_id: str, text: str, lang: str) -> tuple[str, list[dict]]:
        """One incoming message: keep what it states (not when it is a memory command or question: "forget that my
        GPU is a 4090" teaches nothing) and return ``(answer language, facts kept)`` — the user's preferred
        language, when they have one, wins over ``lang`` (the message's own)."""
        intent = memory_intent(text)
        learned = self.learn(user_id, text, lang=lang) if intent is None or intent[0] != "forget" else []
        return self.answer_language(user_id) or lang, learned

    def answer_language(self, user_id: str) -> str | None:
        """``zh`` / ``en`` when the user asked for answers in that language."""
        item = self.store.get(user_namespace(user_id), "language")
        lang = (item.value.get("data") or {}).get("lang") if item is not None else None
        return lang if lang in ("zh", "en") else None

    # --- reading -----------------------------------------------------------------------------
    def show(self, user_id: str) -> list[dict]:
        """Everything kept about ``user_id``: each fact's key, stored value and times, kinds in a fixed order."""
        items = self.store.search(user_namespace(user_id), limit=_LIST_LIMIT)
        order = {k: i for i, k in enumerate(KINDS)}
        items.sort(key=lambda it: (order.get(it.value.get("kind"), len(order)), it.created_at))
        return [{"key": it.key, **it.value, "created_at": it.created_at.isoformat(),
                 "updated_at": it.updated_at.isoformat()} for it in items]

    def profile(self, user_id: str) -> dict[str, dict]:
        """The structured single-valued facts, kind → data (``{"gpu": {"name", "memory_gb", …}, …}``)."""
        ns = user_namespace(user_id)
        found = {}
        for kind in SINGLE:
            item = self.store.get(ns, kind)
            if item is not None:
                found[kind] = item.value.get("data") or {}
        return found

    def recall(self, user_id: str, query: str, *, k: int = 3) -> list[dict]:
        """The facts closest in meaning to ``query``, best first, each with its ``score`` (cosine, plus
        ``KIND_HINT`` when the query names the fact's kind)."""
        hinted = set(kinds_in(query))
        words = content_words(query)
        items = self.store.search(user_namespace(user_id), query=query, limit=_LIST_LIMIT)
        scored = []
        for it in items:
            score = float(it.score) if it.score is not None else 0.0
            if it.value.get("kind") in hinted:
                score += KIND_HINT
            score += WORD_HINT * min(2, len(words & content_words(str(it.value.get("said", "")))))
            scored.append({"key": it.key, **it.value, "score": round(score, 4)})
        scored.sort(key=lambda f: f["score"], reverse=True)
        return scored[:k]

    def answer(self, user_id: str, question: str, lang: str, *, sure: bool = False) -> str | None:
        """The answer to a question about what the user told us; None when memory has nothing on it and the question
        names no known kind of fact (then it is not a memory question after all). ``sure``: answer only from a fact
        that scores ``RECALL_SURE`` or more (nothing else)."""
        hinted = [k for k in kinds_in(question) if k != "note"]
        floor = RECALL_SURE if sure else RECALL_MIN
        ranked = self.recall(user_id, question, k=2)
        hits = [h for h in ranked if h["score"] >= floor]
        if not sure and not hits:     # "what is my corpus?": the kind named settles it when the user told us one
            hits = [h for h in ranked[:1] if h["kind"] in hinted]
        if hits:
            best = [hits[0]] + [h for h in hits[1:] if h["score"] >= hits[0]["score"] - 0.02 and h["kind"] in hinted]
            return fact_text.recalled(best, lang)
        return fact_text.not_known(hinted, lang) if hinted and not sure else None

    def _count_notes(self, ns: tuple[str, ...]) -> int:
        return sum(1 for it in self.store.search(ns, filter={"kind": "note"}, limit=_LIST_LIMIT))


_ZH_FUNCTION = frozenset("的我你是了吗呢吧啊")


def content_words(text: str) -> set[str]:
    """Lower-case words of three letters or more and Chinese character pairs, without function words.

    Example:
        >>> sorted(content_words("which scheduler does my cluster use?")), sorted(content_words("我的服务器在哪"))
        (['cluster', 'scheduler'], ['务器', '器在', '在哪', '服务'])
    """
    words = {w for w in re.findall(r"[a-z0-9][a-z0-9.+#-]{2,}", text.lower())}
    for run in re.findall(r"[\u4e00-\u9fff]+", text):
        words |= {run[i:i + 2] for i in range(len(run) - 1) if not _ZH_FUNCTION.intersection(run[i:i + 2])}
    return words - _STOP


def _lang_of(text: str) -> str | None:
    han = len(re.findall(r"[\u3400-\u9fff]", text))
    return "zh" if han >= 2 else "en" if re.search(r"[A-Za-z]{2,}", text) else None
