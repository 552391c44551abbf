"""User-supplied paths resolve inside the allowed roots (working dir, the user's uploads, data roots) only."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.settings import Settings
from tools.base import ToolContext, ToolError
from tools.paths import resolve_user_path


@pytest.fixture
def layout(tmp_path, monkeypatch) -> dict[str, Path]:
    """A working directory, a home with two users' uploads, and a folder outside every root."""
    work, home, outside = tmp_path / "work", tmp_path / "home", tmp_path / "outside"
    for d in (work, home / "uploads" / "alice", home / "uploads" / "bob", outside):
        d.mkdir(parents=True)
    monkeypatch.chdir(work)
    (home / "uploads" / "alice" / "sales.csv").write_text("a,b\n1,2\n")
    (home / "uploads" / "bob" / "secret.csv").write_text("x\n1\n")
    (work / "local.csv").write_text("c\n3\n")
    (outside / "private.csv").write_text("p\n9\n")
    return {"work": work, "home": home, "outside": outside, "uploads": home / "uploads" / "alice"}


def ctx_for(layout, user="alice", data_roots=()) -> ToolContext:
    return ToolContext(home=layout["home"], user_id=user, data_roots=tuple(data_roots))


def refused(raw: str, ctx: ToolContext) -> ToolError:
    with pytest.raises(ToolError) as err:
        resolve_user_path(raw, ctx)
    return err.value


def test_a_file_in_the_users_uploads_resolves_by_name(layout):
    assert resolve_user_path("sales.csv", ctx_for(layout)) == (layout["uploads"] / "sales.csv").resolve()


def test_an_absolute_path_inside_the_uploads_resolves(layout):
    path = layout["uploads"] / "sales.csv"
    assert resolve_user_path(str(path), ctx_for(layout)) == path.resolve()


def test_a_file_in_the_working_directory_resolves(layout):
    assert resolve_user_path("local.csv", ctx_for(layout)) == (layout["work"] / "local.csv").resolve()


@pytest.mark.parametrize("raw", ["/etc/passwd", "../../etc/passwd", "../../../../../../../../etc/passwd"])
def test_paths_outside_the_roots_are_forbidden(layout, raw):
    err = refused(raw, ctx_for(layout))
    assert err.type == "forbidden_path"
    assert raw in err.message


def test_a_file_outside_every_root_is_forbidden_even_though_it_exists(layout):
    err = refused(str(layout["outside"] / "private.csv"), ctx_for(layout))
    assert err.type == "forbidden_path"


def test_another_users_upload_is_not_readable(layout):
    ctx = ctx_for(layout, "alice")
    assert refused(str(layout["home"] / "uploads" / "bob" / "secret.csv"), ctx).type == "forbidden_path"
    assert refused("../bob/secret.csv", ctx).type == "forbidden_path"
    assert refused("secret.csv", ctx).type == "not_found"


def test_an_absolute_symlink_path_leading_outside_is_forbidden(layout):
    link = layout["uploads"] / "link.csv"
    link.symlink_to(layout["outside"] / "private.csv")
    assert refused(str(link), ctx_for(layout)).type == "forbidden_path"


def test_a_symlink_by_name_leading_outside_is_forbidden(layout):
    (layout["uploads"] / "link.csv").symlink_to(layout["outside"] / "private.csv")
    assert refused("link.csv", ctx_for(layout)).type == "forbidden_path"


def test_a_symlinked_directory_inside_the_root_cannot_lead_outside(layout):
    (layout["work"] / "shortcut").symlink_to(layout["outside"], target_is_directory=True)
    assert refused("shortcut/private.csv", ctx_for(layout)).type == "forbidden_path"
    assert refused(str(layout["work"] / "shortcut" / "private.csv"), ctx_for(layout)).type == "forbidden_path"


def test_a_missing_file_is_not_found_with_its_name(layout):
    err = refused("nope.csv", ctx_for(layout))
    assert err.type == "not_found"
    assert "nope.csv" in err.message


def test_a_new_file_may_be_named_when_it_need_not_exist(layout):
    path = resolve_user_path("out.csv", ctx_for(layout), must_exist=False)
    assert path.parent in (layout["uploads"].resolve(), layout["work"].resolve())


@pytest.mark.parametrize("raw", ["", "a\x00b.csv"])
def test_empty_or_nul_names_are_invalid(layout, raw):
    assert refused(raw, ctx_for(layout)).type == "invalid_path"


def test_stackwise_data_roots_allow_an_extra_folder(layout, tmp_path):
    extra = tmp_path / "datasets"
    extra.mkdir()
    (extra / "big.csv").write_text("z\n1\n")
    assert refused(str(extra / "big.csv"), ctx_for(layout)).type == "forbidden_path"
    settings = Settings.from_env({"STACKWISE_HOME": str(layout["home"]), "STACKWISE_DATA_ROOTS": str(extra)})
    ctx = ctx_for(layout, data_roots=settings.data_roots)
    assert resolve_user_path(str(extra / "big.csv"), ctx) == (extra / "big.csv").resolve()
    assert resolve_user_path("big.csv", ctx) == (extra / "big.csv").resolve()
    # The extra root does not open its parent.
    assert refused(str(layout["outside"] / "private.csv"), ctx).type == "forbidden_path"


@pytest.mark.parametrize("user", ["alice/../bob", ".."])
def test_a_user_id_cannot_step_into_another_users_uploads(layout, user):
    bobs = (layout["home"] / "uploads" / "bob" / "secret.csv").resolve()
    for raw in ("secret.csv", "bob/secret.csv", "uploads/bob/secret.csv"):
        try:
            got = resolve_user_path(raw, ctx_for(layout, user))
        except ToolError:
            continue
        assert got != bobs, f"user {user!r} read {raw!r}"
