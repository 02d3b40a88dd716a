"""Inductor's vector instruction-set checks run once per machine: the first process records them, later ones trust
the record, and a machine where a check failed keeps checking."""

import json
import platform

import pytest

from core.backends import vector_isa

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="inductor checks x86 instruction sets only")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vector_isa.trusted_isa_options.cache_clear()
    yield tmp_path
    vector_isa.trusted_isa_options.cache_clear()


def records(cache) -> list[dict]:
    return [json.loads(memo.read_text()) for memo in (cache / "recipes-scaffold" / "inductor-vector-isa").glob("*")]


def test_the_first_process_checks_and_records_later_ones_trust_the_record(own_cache, monkeypatch):
    options = vector_isa.trusted_isa_options()
    [record] = records(own_cache)
    assert record["all_passed"] == (record["listed"] == record["checked"] != [])
    assert options == ({"cpp.vec_isa_ok": True} if record["all_passed"] else {})

    def checks_again():
        raise AssertionError("a recorded machine was checked again")

    monkeypatch.setattr(vector_isa, "_listed_and_checked", checks_again)
    vector_isa.trusted_isa_options.cache_clear()
    assert vector_isa.trusted_isa_options() == options


def test_a_failed_check_keeps_inductor_checking(own_cache, monkeypatch):
    monkeypatch.setattr(vector_isa, "_listed_and_checked", lambda: (["avx512", "avx2"], ["avx2"]))
    assert vector_isa.trusted_isa_options() == {}
    [record] = records(own_cache)
    assert record == {"listed": ["avx512", "avx2"], "checked": ["avx2"], "all_passed": False}


def test_an_unreadable_record_is_checked_and_written_again(own_cache, monkeypatch):
    monkeypatch.setattr(vector_isa, "_listed_and_checked", lambda: (["avx2"], ["avx2"]))
    memo = vector_isa.memo_dir() / f"{vector_isa._machine_key()}.json"
    memo.parent.mkdir(parents=True)
    memo.write_text("{not json")
    assert vector_isa.trusted_isa_options() == {"cpp.vec_isa_ok": True}
    assert json.loads(memo.read_text())["all_passed"] is True


def test_the_users_own_setting_wins(own_cache):
    from torch._inductor import config

    with config.patch({"cpp.vec_isa_ok": False}):
        assert vector_isa.trusted_isa_options() == {}
    assert records(own_cache) == []


def test_a_machine_without_a_compiler_is_left_to_inductor(own_cache, monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert vector_isa.trusted_isa_options() == {}
    assert records(own_cache) == []
