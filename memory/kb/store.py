"""The knowledge base: shipped concept cards plus ingested documents, searched by dense vectors
(Chroma), BM25 (jieba for Chinese) and concept names, fused by reciprocal-rank fusion.

Namespaces keep documents apart: ``cards`` (shipped), ``shared`` (the CLI's ``kb ingest``) and one per
user (documents a user adds from a chat). A search sees the cards, the shared documents and the
asking user's own documents, never another user's.

Example:
    >>> import tempfile; from pathlib import Path
    >>> kb = KnowledgeBase(Path(tempfile.mkdtemp()))
    >>> kb.search("what is QLoRA", k=1)[0].card
    'qlora'
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memory.kb.bm25 import BM25
from memory.kb.cards import Card, cards_fingerprint, load_cards
from memory.kb.chunks import chunk_sections, split_sentences
from memory.kb.index import KnowledgeError, Records
from memory.kb.names import NameIndex, NameMatch
from memory.kb.readers import DocumentError, limit_for, read_sections
from memory.kb.text import add_words, tokenize
from memory.kb.vectors import VectorStore, collection_name

log = logging.getLogger(__name__)

DEFAULT_KB_EMBEDDER = "use-multilingual"
RRF_K = 5
CANDIDATES = 40
MAX_QUERY_CHARS = 2000
MAX_SENTENCE_VECTORS = 24
NAME_WEIGHT = 1.5
DENSE_WEIGHT = 1.0
BM25_WEIGHT = 1.0
DOC_CUE_WEIGHT = 1.0
IMPUTE_MIN_DENSE = 0.2  # chosen on the dev half: below it a dense rank is noise
CROSS_LINGUAL_GAP = 0.06  # chosen on the even half of the retrieval eval set, checked on the odd half
_ABOUT_OUR_DOCS = re.compile(r"\bours?\b|\bour team\b|\bin (?:the|my|our) (?:notes|docs|runbook|handbook|"
                             r"guide|checklist|wiki)\b|我们的|咱们|我司|我们公司|团队|内部|手册|清单|文档里|规范里|指南里",
                             re.IGNORECASE)
Retriever = Literal["hybrid", "dense", "bm25", "dense+bm25"]
RETRIEVERS = ("hybrid", "dense", "bm25", "dense+bm25")


@dataclass
class Hit:
    """One search result: a card (``card`` set) or a chunk of a document."""

    id: str
    kind: str
    card: str | None
    source: str
    title: str
    section: str
    lang: str
    text: str
    score: float
    namespace: str
    dense: float | None = None  # cosine similarity of the query to this item's best chunk, when searched densely
    # Where the item stood in each ranked list (1 = first): "dense", "bm25", "name" (absent: not in it).
    ranks: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def user_namespace(user: str) -> str:
    return "u-" + hashlib.sha256(user.encode()).hexdigest()[:16]


def card_chunks(card: Card) -> list[tuple[str, str, str, str]]:
    """(chunk id, lang, section, text) for a card: what it is, and how/when/pitfalls, per language."""
    latin = ", ".join(a for a in card.aliases if a.isascii())
    rows = []
    for lang in ("en", "zh"):
        side = card.side(lang)
        names = ", ".join(card.aliases) if lang == "zh" else latin
        first = split_sentences(side.definition)[0] if side.definition else ""
        # A short "what is it" chunk matches short questions; the long ones carry the detail.
        rows.append((f"card:{card.id}:{lang}:0", lang, "name", f"{side.title}\n{names}\n{first}"))
        rows.append((f"card:{card.id}:{lang}:1", lang, "definition",
                     f"{side.title}\n{side.definition}\n{side.intuition}"))
        rows.append((f"card:{card.id}:{lang}:2", lang, "how it works",
                     f"{side.title}\n" + "\n".join([*side.how, side.when, *side.pitfalls])))
    return rows


def vector_units(chunk_id: str, heading: str, text: str) -> list[tuple[str, str]]:
    """What gets a vector for one chunk: the chunk, and each of its sentences under its heading.

    A question usually asks about one thing a chunk says; a sentence vector matches that far better
    than the vector of the whole chunk (the search takes each chunk's best match)."""
    units = [(chunk_id, f"{heading}\n{text}")]
    body = text.split("\n", 1)[1] if text.startswith(heading) and "\n" in text else text
    sentences = [s for line in body.splitlines() for s in split_sentences(line) if len(s) >= 12]
    if len(sentences) > 1:
        units += [(f"{chunk_id}~{n}", f"{heading}: {s}") for n, s in enumerate(sentences[:MAX_SENTENCE_VECTORS])]
    return units


class _View:
    """Chunks of some namespaces, one BM25 over them, and each chunk's result item: a card's chunks
    share one item (a card is one result), a document chunk is its own."""

    def __init__(self, rows: list[tuple[str, tuple]]):
        self.spaces = list(dict.fromkeys(ns for ns, _ in rows))
        self.position = {row[0]: i for i, (_, row) in enumerate(rows)}
        self.bm25 = BM25([row[7].split(" ") if row[7] else [] for _, row in rows])
        self.card_item: dict[str, int] = {}
        self.item = [self.card_item.setdefault(row[2], i) if row[2] else i for i, (_, row) in enumerate(rows)]
        self.rows = rows
        self.ns_index = np.asarray([self.spaces.index(ns) for ns, _ in rows], dtype=np.int64)

    def bm25_top(self, terms: list[str], n: int) -> list[int]:
        """Best rows by BM25 with global term statistics, each namespace's scores scaled to its best:
        the user's notes and the cards are different kinds of text, and neither should drown the other."""
        scores = self.bm25.scores(terms)
        if not scores.size or not scores.any():
            return []
        best = np.zeros(len(self.spaces), dtype=np.float32)
        np.maximum.at(best, self.ns_index, scores)
        scaled = scores / np.maximum(best[self.ns_index], 1e-9)
        positive = np.flatnonzero(scores > 0)
        return [int(i) for i in positive[np.argsort(-scaled[positive], kind="stable")[: n * 3]]]


class KnowledgeBase:
    def __init__(self, home: Path, *, embedder: str = DEFAULT_KB_EMBEDDER, chroma_url: str | None = None,
                 embedder_factory: Callable[[str | None], Any] | None = None, cards: list[Card] | None = None):
        self.home = Path(home)
        self._given_cards = cards  # None: the shipped cards (tests pass a few)
        self.embedder_name = embedder
        self.chroma_url = chroma_url
        self._factory = embedder_factory
        self._lock = threading.RLock()
        self._records: Records | None = None
        self._vectors: VectorStore | None = None
        self._views: dict[tuple[str, ...], _View] = {}
        self._version = -1
        self._names: NameIndex | None = None
        self._cards: dict[str, Card] | None = None
        self._ready = False

    # -- parts, opened lazily -------------------------------------------------------------------
    @property
    def records(self) -> Records:
        if self._records is None:
            # Chunks, hashes and vectors belong together: another embedder is another index
            # (documents are ingested again for it; the cards index themselves).
            self._records = Records(self.home / "kb" / f"index-{collection_name('x', self.embedder_name)[5:]}.sqlite")
        return self._records

    @property
    def vectors(self) -> VectorStore:
        if self._vectors is None:
            self._vectors = VectorStore(self.home / "kb" / "chroma", url=self.chroma_url)
        return self._vectors

    def embedder(self):
        if self._factory is not None:
            return self._factory(self.embedder_name)
        from memory.embedders import load_embedder

        return load_embedder(self.embedder_name)

    def cards(self) -> dict[str, Card]:
        if self._cards is None:
            cards = load_cards() if self._given_cards is None else self._given_cards
            self._cards = {card.id: card for card in cards}
        return self._cards

    def card(self, card_id: str) -> Card | None:
        return self.cards().get(card_id)

    def names(self) -> NameIndex:
        if self._names is None:
            cards = self.cards().values()
            add_words(name for card in cards for name in card.names())
            self._names = NameIndex({card.id: card.names() for card in cards})
        return self._names

    def _embed_tag(self) -> str:
        return self.embedder().name

    # -- the shipped cards ----------------------------------------------------------------------
    def ensure_ready(self) -> None:
        """Index the shipped cards if this base has not seen this version of them with this embedder."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            self.names()
            if self._given_cards is None:
                fingerprint = cards_fingerprint()
            else:
                dump = "".join(c.model_dump_json() for c in self._given_cards)
                fingerprint = hashlib.sha256(dump.encode()).hexdigest()
            stamp = f"{fingerprint}|{self._embed_tag()}"
            if self.records.get_meta("cards") != stamp \
                    or not self.vectors.count("cards", self._embed_tag()):
                self._index_cards()
                self.records.set_meta("cards", stamp)
            self._ready = True

    def _index_cards(self) -> None:
        rows, units = [], []
        for card in self.cards().values():
            for chunk_id, lang, section, text in card_chunks(card):
                title = card.side(lang).title
                rows.append((card.id, (chunk_id, 0, card.id, lang, title, section, text, " ".join(tokenize(text)))))
                units.append((chunk_id, text, card.id))  # sentence vectors measured no better for cards
        log.info("indexing %d card chunks (%d vectors) with %s", len(rows), len(units), self.embedder_name)
        vectors = self.embedder().embed([u[1] for u in units])
        self.vectors.reset("cards", self._embed_tag())
        self.vectors.add("cards", self._embed_tag(), [u[0] for u in units], vectors, [{"card": u[2]} for u in units])
        self.records.drop_namespace("cards")
        by_card: dict[str, list[tuple]] = {}
        for card_id, row in rows:
            by_card.setdefault(card_id, []).append(row)
        for card_id, card_rows in by_card.items():
            card = self.cards()[card_id]
            self.records.replace_source("cards", f"card:{card_id}", card.file, "", 0,
                                        [(r[0], i, *r[2:]) for i, r in enumerate(card_rows)])

    # -- documents -------------------------------------------------------------------------------
    def ingest_file(self, path: Path, *, owner: str | None = None) -> dict:
        """Add or refresh one file (already resolved inside the allowed roots). Returns
        ``{"source", "status": added|updated|unchanged, "chunks"}``; raises DocumentError."""
        self.ensure_ready()
        ns = user_namespace(owner) if owner else "shared"
        source = str(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise DocumentError(f"{path.name} cannot be read ({exc.strerror}).") from None
        limit = limit_for(path)
        if size > limit:
            raise DocumentError(f"{path.name} is {size / 2**20:.0f} MB; files up to {limit // 2**20} MB of this "
                                "type are ingested. Split it or ingest the parts you need.")
        if size == 0:
            raise DocumentError(f"{path.name} is empty.")
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        before = self.records.source(ns, source)
        if before and before["sha"] == sha:
            return {"source": source, "status": "unchanged", "chunks": before["chunks"]}
        chunks = chunk_sections(read_sections(path, data))
        if not chunks:
            raise DocumentError(f"{path.name} has no text to index.")
        key = hashlib.sha256(f"{ns}|{source}".encode()).hexdigest()[:12]
        ids = [f"doc:{key}:{c.seq}" for c in chunks]
        texts = [f"{c.heading}\n{c.text}" for c in chunks]
        units = [u for i, c in enumerate(chunks) for u in vector_units(ids[i], c.heading, c.text)]
        vectors = self.embedder().embed([u[1] for u in units])
        lang = [("zh" if sum("\u4e00" <= ch <= "\u9fff" for ch in t) > len(t) * 0.1 else "en") for t in texts]
        tag = self._embed_tag()
        with self._lock:
            if before:
                self.vectors.delete_where(ns, tag, {"source": source})
            self.vectors.add(ns, tag, [u[0] for u in units], vectors, [{"source": source} for _ in units])
            self.records.replace_source(ns, source, path.name, sha, size, [
                (ids[i], c.seq, None, lang[i], path.name, c.heading, c.text, " ".join(tokenize(texts[i])))
                for i, c in enumerate(chunks)])
        return {"source": source, "status": "updated" if before else "added", "chunks": len(chunks)}

    def has_documents(self, *, owner: str | None = None) -> bool:
        """Whether any document is visible to ``owner`` (shared ones, and their own)."""
        spaces = ["shared"] + ([user_namespace(owner)] if owner else [])
        return any(self.records.sources(ns) for ns in spaces)

    def find_source(self, source: str, *, owner: str | None = None) -> str:
        """The stored source that ``source`` names: the exact path, or a unique file name."""
        ns = user_namespace(owner) if owner else "shared"
        known = self.records.sources(ns)
        exact = [s["source"] for s in known if s["source"] == source]
        if exact:
            return exact[0]
        resolved = str(Path(source).expanduser().resolve()) if source else ""
        by_path = [s["source"] for s in known if s["source"] == resolved]
        if by_path:
            return by_path[0]
        by_name = [s["source"] for s in known if s["name"] == Path(source).name]
        if len(by_name) == 1:
            return by_name[0]
        if len(by_name) > 1:
            raise KnowledgeError(f"{source!r} matches {len(by_name)} sources; give the full path: "
                                 + ", ".join(by_name[:5]))
        raise KnowledgeError(f"No ingested source is called {source!r}. `stackwise kb stats` lists them.")

    def remove(self, source: str, *, owner: str | None = None) -> dict:
        ns = user_namespace(owner) if owner else "shared"
        stored = self.find_source(source, owner=owner)
        with self._lock:
            self.vectors.delete_where(ns, self._embed_tag(), {"source": stored})
            count = self.records.drop_source(ns, stored)
        return {"source": stored, "removed_chunks": count}

    def stats(self, *, owner: str | None = None) -> dict:
        self.ensure_ready()
        ns = user_namespace(owner) if owner else "shared"
        sources = self.records.sources(ns)
        return {
            "cards": len(self.cards()),
            "card_chunks": len(self.records.chunk_ids("cards")),
            "documents": len(sources),
            "document_chunks": sum(s["chunks"] for s in sources),
            "sources": [{"source": s["source"], "chunks": s["chunks"], "bytes": s["bytes"]} for s in sources],
            "embedder": self.embedder_name,
            "store": self.chroma_url or str(self.home / "kb"),
        }

    # -- search ----------------------------------------------------------------------------------
    def _view(self, spaces: tuple[str, ...]) -> _View:
        """The chunks of ``spaces`` with one BM25 index over all of them (global term statistics, so
        a term only the user's notes contain weighs what it should), rebuilt when the base changes."""
        with self._lock:
            version = self.records.version()
            if version != self._version:
                self._views.clear()
                self._version = version
            view = self._views.get(spaces)
            if view is None:
                view = self._views[spaces] = _View([(ns, row) for ns in spaces for row in self.records.load(ns)])
            return view

    def search(self, query: str, *, k: int = 5, owner: str | None = None, retriever: Retriever = "hybrid",
               kinds: tuple[str, ...] = ("card", "doc"), matches: list[NameMatch] | None = None) -> list[Hit]:
        """The ``k`` best cards/chunks for ``query``; a card appears once however many of its chunks match.

        ``matches``: ``self.names().find(query)`` when the caller has it already (explain_concept needs
        the matches too), so the question is scanned for names once."""
        query = (query or "").strip()[:MAX_QUERY_CHARS]
        if not query or retriever not in RETRIEVERS:
            return []
        self.ensure_ready()
        spaces = [ns for ns, kind in (("cards", "card"), ("shared", "doc")) if kind in kinds]
        if owner and "doc" in kinds:
            spaces.append(user_namespace(owner))
        view = self._view(tuple(spaces))
        terms = tokenize(query)  # BM25 terms, and how much the question says (for the weight of names)
        lists: list[tuple[float, list[int]]] = []
        dense: dict[int, float] = {}
        if retriever in ("hybrid", "dense", "dense+bm25"):
            vector = self.embedder().embed([query])[0]
            scored = []
            query_lang = _lang_of(query)
            for ns in view.spaces:
                for vector_id, distance in self.vectors.query(ns, self._embed_tag(), vector, CANDIDATES * 3):
                    index = view.position.get(vector_id.split("~", 1)[0])
                    if index is not None:
                        item = view.item[index]
                        row = view.rows[index][1]
                        # Similarity across languages runs lower than within one; a card has both
                        # languages, a document only its own, so only documents need the correction.
                        gap = CROSS_LINGUAL_GAP if not row[2] and row[3] != query_lang else 0.0
                        scored.append((distance - gap, item))
                        dense[item] = max(dense.get(item, -1.0), 1.0 - float(distance))
            lists.append((DENSE_WEIGHT, _dedupe(i for _, i in sorted(scored))))
        if retriever in ("hybrid", "bm25", "dense+bm25"):
            lists.append((BM25_WEIGHT, _dedupe(view.item[i] for i in view.bm25_top(terms, CANDIDATES))))
        fused: dict[int, float] = {}
        named = []
        if retriever == "hybrid":
            # A concept named in the question counts in proportion to how much of the question it is:
            # all of "what is QLoRA?", a small part of a long question that mentions GPUs in passing.
            content = max(1, len("".join(terms)))
            found = self.names().find(query) if matches is None else matches
            named = [m for m in found if m.card in view.card_item]
            for rank, match in enumerate(named):
                item = view.card_item[match.card]
                share = min(1.0, len(_content_chars(query[match.start:match.end])) / content)
                fused[item] = fused.get(item, 0.0) + NAME_WEIGHT * share / (RRF_K + rank + 1)
        for weight, ranked in lists:
            for rank, item in enumerate(ranked):
                fused[item] = fused.get(item, 0.0) + weight / (RRF_K + rank + 1)
        if retriever in ("hybrid", "dense+bm25"):
            # BM25 cannot see a document written in the other language; rather than count that
            # blindness against it, let such a document stand in BM25 where it stands densely.
            query_lang, in_bm25 = _lang_of(query), set(lists[1][1])
            for rank, item in enumerate(lists[0][1]):
                ns, row = view.rows[item]
                if not row[2] and row[3] != query_lang and item not in in_bm25 \
                        and dense.get(item, 0.0) >= IMPUTE_MIN_DENSE:
                    fused[item] += BM25_WEIGHT / (RRF_K + rank + 1)
        if retriever == "hybrid" and _ABOUT_OUR_DOCS.search(query):
            # "our cluster", "值班手册里": the question is about the user's own material.
            for rank, item in enumerate(lists[0][1]):
                if not view.rows[item][1][2]:
                    fused[item] += DOC_CUE_WEIGHT / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda item: -fused[item])[:k]
        ranks = {label: {item: r + 1 for r, item in enumerate(ranked)} for label, ranked in
                 zip(("dense", "bm25") if retriever != "bm25" else ("bm25",), (r for _, r in lists), strict=False)}
        ranks["name"] = {view.card_item[m.card]: r + 1 for r, m in enumerate(named)}
        return [self._hit(view.rows[item], fused[item], dense.get(item),
                          {label: pos[item] for label, pos in ranks.items() if item in pos}) for item in best]

    def _hit(self, found: tuple[str, tuple], score: float, sim: float | None, ranks: dict[str, int]) -> Hit:
        ns, (chunk_id, source, card, lang, title, section, text, _tokens) = found
        common = {"section": section, "lang": lang, "text": text, "score": round(score, 6), "namespace": ns,
                  "dense": None if sim is None else round(sim, 4), "ranks": ranks, "title": title}
        if card:
            return Hit(id=f"kb:{card}", kind="card", card=card, source=self.cards()[card].file, **common)
        return Hit(id=chunk_id, kind="doc", card=None, source=source, **common)

    def similarity(self, query: str, texts: list[str]) -> np.ndarray:
        """Cosine similarity of ``query`` to each text with the base's embedder (for confidence checks)."""
        vectors = self.embedder().embed([query, *texts])
        return vectors[1:] @ vectors[0]

    def close(self) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None
        if self._vectors is not None:
            self._vectors.close()
            self._vectors = None


def _lang_of(text: str) -> str:
    return "zh" if sum("\u4e00" <= ch <= "\u9fff" for ch in text) >= 2 else "en"


def _content_chars(text: str) -> str:
    """Letters, digits and Chinese characters outside question words: how much a text says."""
    return "".join(tokenize(text))


def _dedupe(items) -> list:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)
