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
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memory.kb.bm25 import BM25
from memory.kb.cards import Card, cards_fingerprint, load_cards
from memory.kb.chunks import chunk_sections, split_sentences
from memory.kb.index import KnowledgeError, Records
from memory.kb.names import NameIndex
from memory.kb.readers import DocumentError, limit_for, read_sections
from memory.kb.text import add_words, tokenize
from memory.kb.vectors import VectorStore, collection_name

log = logging.getLogger(__name__)

DEFAULT_KB_EMBEDDER = "use-multilingual"
RRF_K = 60
CANDIDATES = 40
MAX_QUERY_CHARS = 2000
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


class _Namespace:
    """One namespace's in-memory BM25 and chunk table, rebuilt when the records' version moves."""

    def __init__(self, rows: list[tuple]):
        self.rows = rows
        self.position = {row[0]: i for i, row in enumerate(rows)}
        self.bm25 = BM25([row[7].split(" ") if row[7] else [] for row in rows])


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
        self._spaces: dict[str, _Namespace] = {}
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
        rows, texts, ids = [], [], []
        for card in self.cards().values():
            for chunk_id, lang, section, text in card_chunks(card):
                rows.append((card.id, (chunk_id, 0, card.id, lang, card.side(lang).title, section, text,
                                       " ".join(tokenize(text)))))
                texts.append(text)
                ids.append(chunk_id)
        log.info("indexing %d card chunks with %s", len(ids), self.embedder_name)
        vectors = self.embedder().embed(texts)
        self.vectors.reset("cards", self._embed_tag())
        self.vectors.add("cards", self._embed_tag(), ids, vectors, [{"card": r[0]} for r in rows])
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
        vectors = self.embedder().embed(texts)
        lang = [("zh" if sum("\u4e00" <= ch <= "\u9fff" for ch in t) > len(t) * 0.1 else "en") for t in texts]
        tag = self._embed_tag()
        with self._lock:
            old = self.records.chunk_ids(ns, source)
            if old:
                self.vectors.delete(ns, tag, old)
            self.vectors.add(ns, tag, ids, vectors, [{"source": source} for _ in ids])
            self.records.replace_source(ns, source, path.name, sha, size, [
                (ids[i], c.seq, None, lang[i], path.name, c.heading, c.text, " ".join(tokenize(texts[i])))
                for i, c in enumerate(chunks)])
        return {"source": source, "status": "updated" if before else "added", "chunks": len(chunks)}

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
        ids = self.records.chunk_ids(ns, stored)
        with self._lock:
            if ids:
                self.vectors.delete(ns, self._embed_tag(), ids)
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
    def _space(self, ns: str) -> _Namespace:
        version = self.records.version()
        if version != self._version:
            self._spaces.clear()
            self._version = version
        space = self._spaces.get(ns)
        if space is None:
            space = self._spaces[ns] = _Namespace(self.records.load(ns))
        return space

    def search(self, query: str, *, k: int = 5, owner: str | None = None, retriever: Retriever = "hybrid",
               kinds: tuple[str, ...] = ("card", "doc")) -> list[Hit]:
        """The ``k`` best cards/chunks for ``query``; a card appears once however many of its chunks match."""
        query = (query or "").strip()[:MAX_QUERY_CHARS]
        if not query or retriever not in RETRIEVERS:
            return []
        self.ensure_ready()
        spaces = [ns for ns, kind in (("cards", "card"), ("shared", "doc")) if kind in kinds]
        if owner and "doc" in kinds:
            spaces.append(user_namespace(owner))
        with self._lock:
            loaded = {ns: self._space(ns) for ns in spaces}
        spaces = [ns for ns in spaces if loaded[ns].rows]
        lists: list[tuple[float, list[str]]] = []
        rows: dict[str, tuple[str, tuple]] = {}
        dense: dict[str, float] = {}

        def key(ns: str, row: tuple) -> str:
            rows.setdefault(row[2] and f"card:{row[2]}" or row[0], (ns, row))
            return row[2] and f"card:{row[2]}" or row[0]

        if retriever in ("hybrid", "dense", "dense+bm25"):
            vector = self.embedder().embed([query])[0]
            scored = []
            for ns in spaces:
                for chunk_id, distance in self.vectors.query(ns, self._embed_tag(), vector, CANDIDATES):
                    index = loaded[ns].position.get(chunk_id)
                    if index is not None:
                        item = key(ns, loaded[ns].rows[index])
                        scored.append((distance, item))
                        dense[item] = max(dense.get(item, -1.0), 1.0 - float(distance))
            lists.append((1.0, _dedupe(k for _, k in sorted(scored))))
        if retriever in ("hybrid", "bm25", "dense+bm25"):
            terms = tokenize(query)
            scored = []
            for ns in spaces:
                for index, score in loaded[ns].bm25.top(terms, CANDIDATES):
                    scored.append((-score, key(ns, loaded[ns].rows[index])))
            lists.append((1.0, _dedupe(k for _, k in sorted(scored))))
        if retriever == "hybrid" and "cards" in spaces:
            named = [f"card:{m.card}" for m in self.names().find(query)]
            for name in named:
                card_rows = loaded["cards"].rows
                first = next((r for r in card_rows if r[2] == name[5:]), None)
                if first is not None:
                    key("cards", first)
            lists.append((2.0, [n for n in named if n in rows]))
        fused: dict[str, float] = {}
        for weight, ranked in lists:
            for rank, item in enumerate(ranked):
                fused[item] = fused.get(item, 0.0) + weight / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda item: -fused[item])[:k]
        return [self._hit(item, rows[item], fused[item], dense.get(item)) for item in best]

    def _hit(self, item: str, found: tuple[str, tuple], score: float, sim: float | None) -> Hit:
        ns, (chunk_id, source, card, lang, title, section, text, _tokens) = found
        if card:
            return Hit(id=f"kb:{card}", kind="card", card=card, source=self.cards()[card].file, title=title,
                       section=section, lang=lang, text=text, score=round(score, 6), namespace=ns,
                       dense=None if sim is None else round(sim, 4))
        return Hit(id=chunk_id, kind="doc", card=None, source=source, title=title, section=section, lang=lang,
                   text=text, score=round(score, 6), namespace=ns, dense=None if sim is None else round(sim, 4))

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


def _dedupe(items) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)
