"""``stackwise kb``: ingest (files, folders, progress, hashes), search --json, stats, remove, bad input."""

from __future__ import annotations

import json
import subprocess


def run(stackwise_bin, env, *args, cwd=None):
    return subprocess.run([stackwise_bin, "kb", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_ingest_search_stats_remove(stackwise_bin, cli_env, seed_home, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "handbook.md").write_text("# Handbook\n## Builds\nNightly builds run on the Osprey runner at 03:00.\n")
    (docs / "sub" / "faq.html").write_text("<h1>FAQ</h1><h2>Access</h2><p>VPN tokens rotate every 30 days.</p>")
    (docs / "sub" / "image.png").write_bytes(b"\x89PNG not a document")
    first = run(stackwise_bin, cli_env, "ingest", "docs", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert len(result["added"]) == 2 and result["failed"] == [] and result["chunks"] == 2
    again = json.loads(run(stackwise_bin, cli_env, "ingest", "docs", "--json", cwd=tmp_path).stdout)
    assert len(again["unchanged"]) == 2 and again["chunks"] == 0

    found = run(stackwise_bin, cli_env, "search", "when do nightly builds run", "--k", "3", "--json")
    assert found.returncode == 0
    payload = json.loads(found.stdout)
    top = payload["results"][0]
    assert top["kind"] == "doc" and top["source"].endswith("handbook.md") and top["section"] == "Handbook > Builds"
    card = json.loads(run(stackwise_bin, cli_env, "search", "什么是 QLoRA", "--json").stdout)["results"][0]
    assert card["card"] == "qlora"

    stats = json.loads(run(stackwise_bin, cli_env, "stats", "--json").stdout)
    assert stats["cards"] >= 150 and stats["documents"] == 2
    removed = run(stackwise_bin, cli_env, "remove", "faq.html")
    assert removed.returncode == 0 and "faq.html" in removed.stdout
    assert json.loads(run(stackwise_bin, cli_env, "stats", "--json").stdout)["documents"] == 1


def test_bad_paths_are_reported_and_the_rest_is_ingested(stackwise_bin, cli_env, seed_home, tmp_path):
    (tmp_path / "ok.txt").write_text("PLAIN NOTES\nthe staging cluster is called Kestrel\n")
    (tmp_path / "empty.md").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") + bytes(range(0, 9)) * 20)
    out = run(stackwise_bin, cli_env, "ingest", "ok.txt", "empty.md", "latin1.txt", "/etc/passwd", "../../x.md",
              "missing.md", "--json", cwd=tmp_path)
    assert out.returncode == 1
    result = json.loads(out.stdout)
    assert [a["source"].rsplit("/", 1)[-1] for a in result["added"]] == ["ok.txt"]
    reasons = {f["path"].rsplit("/", 1)[-1]: f["error"] for f in result["failed"]}
    assert "empty" in reasons["empty.md"] and "binary" in reasons["latin1.txt"]
    assert "outside" in reasons["passwd"] or "allowed" in reasons["passwd"]
    assert set(reasons) == {"empty.md", "latin1.txt", "passwd", "x.md", "missing.md"}
    assert "Traceback" not in out.stderr


def test_search_usage_errors_exit_2(stackwise_bin, cli_env):
    for args in (["search", "   "], ["search", "x" * 100_000], ["search", "lora", "--k", "0"]):
        out = run(stackwise_bin, cli_env, *args, "--json")
        assert out.returncode == 2 and "error" in json.loads(out.stdout)
    missing = run(stackwise_bin, cli_env, "remove", "nothing.md")
    assert missing.returncode == 1 and "No ingested source" in missing.stderr
