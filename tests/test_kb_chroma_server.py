"""Server mode: the knowledge base on a real ``chroma run`` server on loopback, started by the test."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_kb_store import CARDS, write

from memory.kb.index import KnowledgeError
from memory.kb.store import KnowledgeBase

CHROMA = Path(sys.executable).parent / "chroma"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    port = free_port()
    data = tmp_path_factory.mktemp("chroma-server")
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen([str(CHROMA), "run", "--path", str(data / "db"), "--host", "127.0.0.1", "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"chroma run exited: {(data / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("chroma run did not answer within 60 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_cards_and_documents_live_on_the_server(chroma_server, tmp_path):
    kb = KnowledgeBase(tmp_path / "home", chroma_url=chroma_server, cards=CARDS)
    try:
        assert kb.search("QLoRA on a 4-bit NF4 base", k=1)[0].card == "qlora"
        doc = write(tmp_path / "runbook.md", "# Runbook\n## Paging\nPage the duty engineer via the Heron bridge.\n")
        assert kb.ingest_file(doc)["status"] == "added"
        assert kb.search("how do I page the duty engineer", k=1)[0].source == str(doc)
        assert kb.stats()["store"] == chroma_server
        names = {c.name for c in kb.vectors.client.list_collections()}
        assert any(n.startswith("sw-cards-") for n in names) and any(n.startswith("sw-shared-") for n in names)
    finally:
        kb.close()
    # A second process (a fresh client) sees the same vectors without re-indexing the cards.
    again = KnowledgeBase(tmp_path / "home", chroma_url=chroma_server, cards=CARDS)
    assert again.search("page the duty engineer", k=1)[0].kind == "doc"
    again.close()


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    kb = KnowledgeBase(tmp_path / "home", chroma_url=f"http://127.0.0.1:{free_port()}", cards=CARDS)
    with pytest.raises(KnowledgeError, match="does not answer"):
        kb.search("LoRA")
