"""The knowledge base with a few cards: indexing, hybrid search, ingestion by content hash, namespaces."""

from __future__ import annotations

import pytest

from memory.kb.bm25 import BM25
from memory.kb.cards import Card
from memory.kb.index import KnowledgeError
from memory.kb.names import NameIndex
from memory.kb.readers import DocumentError
from memory.kb.store import KnowledgeBase
from memory.kb.text import tokenize


def card(cid: str, title: str, zh_title: str, definition: str, zh_definition: str, aliases: list[str]) -> Card:
    side = {"intuition": "an everyday picture of it", "how": ["first step here", "second step here"],
            "when": "when it helps, for example here", "pitfalls": ["a common mistake"]}
    zh_side = {"intuition": "一个日常生活中的比喻说明", "how": ["第一步的说明", "第二步的说明"],
               "when": "什么时候用，例如这里", "pitfalls": ["一个常见错误"]}
    return Card.model_validate({
        "id": cid, "category": "frameworks & algorithms", "aliases": aliases, "related": [],
        "sources": ["A paper — https://example.org/paper"],
        "en": {"title": title, "definition": definition, **side},
        "zh": {"title": zh_title, "definition": zh_definition, **zh_side}})


CARDS = [
    card("lora", "LoRA (Low-Rank Adaptation)", "LoRA（低秩适配）",
         "LoRA freezes the pretrained weights and trains two small low-rank matrices per layer.",
         "LoRA 冻结预训练权重，只在每层训练两个小的低秩矩阵。", ["LoRA", "low-rank adaptation", "低秩适配"]),
    card("qlora", "QLoRA", "QLoRA（4 位量化 LoRA）",
         "QLoRA trains LoRA adapters on top of a base model quantised to 4-bit NF4 to save GPU memory.",
         "QLoRA 在量化为 4 位 NF4 的基座模型上训练 LoRA 适配器，以节省显存。", ["QLoRA", "量化低秩适配"]),
    card("pytorch", "PyTorch", "PyTorch 深度学习框架",
         "PyTorch is a Python deep-learning framework with eager tensors and automatic differentiation.",
         "PyTorch 是一个 Python 深度学习框架，提供即时执行的张量和自动求导。", ["PyTorch", "torch"]),
    card("cosine-similarity", "Cosine similarity", "余弦相似度",
         "Cosine similarity measures the angle between two vectors, ignoring their lengths.",
         "余弦相似度衡量两个向量之间的夹角，不受向量长度影响。", ["cosine similarity", "cosine", "余弦相似度"]),
]


@pytest.fixture
def kb(tmp_path):
    base = KnowledgeBase(tmp_path / "home", cards=CARDS)
    yield base
    base.close()


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.resolve()


def test_bm25_ranks_the_rarer_term_higher():
    index = BM25([["lora", "adapter"], ["adapter", "layer"], ["adapter"]])
    assert index.top(["lora", "adapter"], 3)[0][0] == 0
    assert index.top(["missing"], 3) == []


def test_tokenize_segments_chinese_and_drops_question_words():
    tokens = tokenize("什么是余弦相似度？What ARE embeddings")
    assert "什么" not in tokens and "what" not in tokens and "embedding" in tokens
    assert any("余弦" in t for t in tokens)


def test_names_find_typos_and_prefer_the_longest_name():
    index = NameIndex({"r1": ["DeepSeek-R1"], "distill": ["DeepSeek-R1-Distill"], "pytorch": ["PyTorch"]})
    assert [m.card for m in index.find("tune DeepSeek-R1-Distill-Qwen-7B")] == ["distill"]
    [match] = index.find("is pytroch hard?")
    assert (match.card, match.exact) == ("pytorch", False)
    assert index.find("the model is fine") == []


@pytest.mark.parametrize(("query", "expected"), [
    ("what is LoRA", "lora"), ("什么是低秩适配", "lora"), ("QLoRA 是什么", "qlora"), ("pytroch", "pytorch"),
    ("how do I measure the angle between two embedding vectors", "cosine-similarity"),
])
def test_hybrid_search_finds_the_card(kb, query, expected):
    hits = kb.search(query, k=3)
    assert hits[0].kind == "card" and hits[0].card == expected
    assert hits[0].id == f"kb:{expected}" and len({h.card for h in hits}) == len(hits)


def test_every_retriever_answers_and_unknown_ones_return_nothing(kb):
    for retriever in ("dense", "bm25", "dense+bm25", "hybrid"):
        assert kb.search("LoRA low-rank matrices", k=2, retriever=retriever)[0].card == "lora"
    assert kb.search("LoRA", retriever="magic") == [] and kb.search("   ") == []


def test_ingest_skips_unchanged_replaces_changed_and_removes(kb, tmp_path):
    doc = write(tmp_path / "notes" / "team.md", "# Team notes\n## GPUs\nOur cluster Zephyr has 64 H200 cards.\n")
    assert kb.ingest_file(doc)["status"] == "added"
    assert kb.ingest_file(doc)["status"] == "unchanged"
    assert kb.search("how many cards does Zephyr have", k=1)[0].source == str(doc)
    write(doc, "# Team notes\n## GPUs\nOur cluster Boreas has 8 A100 cards.\n")
    assert kb.ingest_file(doc)["status"] == "updated"
    texts = " ".join(h.text for h in kb.search("cluster cards", k=5) if h.kind == "doc")
    assert "Boreas" in texts and "Zephyr" not in texts
    stats = kb.stats()
    assert (stats["cards"], stats["documents"], stats["document_chunks"]) == (4, 1, 1)
    assert kb.remove("team.md") == {"source": str(doc), "removed_chunks": 1}
    assert all(h.kind == "card" for h in kb.search("Boreas cluster cards", k=5))
    with pytest.raises(KnowledgeError, match="No ingested source"):
        kb.remove("team.md")


def test_documents_of_one_user_are_invisible_to_another(kb, tmp_path):
    secret = write(tmp_path / "a" / "alice.md", "# Alice\nThe launch code word is pineapple-umbrella.\n")
    shared = write(tmp_path / "s" / "handbook.md", "# Handbook\nThe office wifi is called stackwise-guest.\n")
    kb.ingest_file(secret, owner="alice")
    kb.ingest_file(shared)
    assert any("pineapple" in h.text for h in kb.search("launch code word", owner="alice"))
    for owner in ("bob", None):
        assert not any("pineapple" in h.text for h in kb.search("launch code word pineapple", owner=owner))
        assert any("stackwise-guest" in h.text for h in kb.search("office wifi name", owner=owner))
    with pytest.raises(KnowledgeError):
        kb.remove("alice.md", owner="bob")


@pytest.mark.parametrize(("name", "data", "message"), [
    ("empty.md", b"", "empty"),
    ("blob.txt", b"\x00\x01\x02\x03" * 100, "binary"),
    ("fake.pdf", b"not a pdf at all", "not a PDF"),
    ("blank.md", b"   \n\n  ", "no text"),
])
def test_bad_documents_are_refused_clearly_and_change_nothing(kb, tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DocumentError, match=message):
        kb.ingest_file(path.resolve())
    assert kb.stats()["documents"] == 0


def test_a_200_mb_file_is_refused_without_reading_it(kb, tmp_path):
    path = tmp_path / "huge.txt"
    with path.open("wb") as fh:
        fh.truncate(200 * 2**20)  # sparse: nothing is written or read
    with pytest.raises(DocumentError, match="200 MB"):
        kb.ingest_file(path.resolve())


def test_changed_cards_are_reindexed(tmp_path):
    home = tmp_path / "home"
    KnowledgeBase(home, cards=CARDS[:2]).search("LoRA")
    again = KnowledgeBase(home, cards=CARDS)
    assert again.search("PyTorch framework", k=1)[0].card == "pytorch"
