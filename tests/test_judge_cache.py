"""The on-disk judge cache: keys, integrity checks, concurrent writers."""

from __future__ import annotations

import json
import threading

import pytest

from explore_persona_space.judge.cache import JudgeCache, cache_key
from explore_persona_space.judge.prompts import PromptTemplate, load_prompt

BASE = dict(
    model="claude-sonnet-5-5",
    prompt_version="v" * 64,
    inputs={"question": "q", "completion": "c"},
    sampling={"max_tokens": 1024, "temperature": None},
)
RECORD = {
    "text": "ANSWER: YES",
    "stop_reason": "end_turn",
    "model": "m",
    "input_tokens": 10,
    "output_tokens": 2,
}


@pytest.mark.parametrize(
    "change",
    [
        {"model": "claude-sonnet-4-5"},
        {"prompt_version": "w" * 64},
        {"inputs": {"question": "q", "completion": "c "}},  # one trailing space is another input
        {"sampling": {"max_tokens": 1024, "temperature": 0.0}},
    ],
)
def test_every_part_of_the_key_matters(change):
    assert cache_key(**BASE) != cache_key(**{**BASE, **change})


def test_key_is_stable_and_order_free():
    again = {**BASE, "inputs": {"completion": "c", "question": "q"}}
    assert cache_key(**BASE) == cache_key(**again)
    assert len(cache_key(**BASE)) == 64


def test_prompt_version_is_sha256_of_text_and_edits_change_it():
    t = load_prompt("discriminator")
    assert len(t.version) == 64
    edited = PromptTemplate(t.name, t.text + " ")
    assert edited.version != t.version
    with pytest.raises(ValueError, match="missing placeholders"):
        t.render(question="q")


def test_roundtrip_and_miss(tmp_path):
    cache = JudgeCache(tmp_path)
    key = cache_key(**BASE)
    assert cache.get(key) is None
    cache.put(key, RECORD)
    assert cache.get(key) == RECORD
    assert not list(tmp_path.rglob(".tmp-*"))  # no temporary files left behind


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # torn write
        lambda raw: "",  # empty file
        lambda raw: raw.replace("ANSWER: YES", "ANSWER: NO "),  # record edited, digest stale
        lambda raw: raw.replace('"schema":1', '"schema":2'),
        lambda raw: "\udcff",  # not UTF-8 once written with surrogateescape
    ],
)
def test_damaged_entries_are_misses_not_verdicts(tmp_path, damage):
    cache = JudgeCache(tmp_path)
    key = cache_key(**BASE)
    cache.put(key, RECORD)
    path = cache.path(key)
    path.write_bytes(damage(path.read_text()).encode("utf-8", "surrogateescape"))
    assert cache.get(key) is None


def test_an_entry_copied_under_another_key_is_a_miss(tmp_path):
    cache = JudgeCache(tmp_path)
    k1, k2 = cache_key(**BASE), cache_key(**{**BASE, "model": "other"})
    cache.put(k1, RECORD)
    cache.path(k2).parent.mkdir(parents=True, exist_ok=True)
    cache.path(k2).write_text(cache.path(k1).read_text())
    assert cache.get(k2) is None


def test_concurrent_writers_and_readers_never_see_a_partial_entry(tmp_path):
    key = cache_key(**BASE)
    big = {**RECORD, "text": "x" * 200_000}
    seen: list[object] = []
    stop = threading.Event()

    def writer():
        c = JudgeCache(tmp_path)
        for _ in range(30):
            c.put(key, big)

    def reader():
        c = JudgeCache(tmp_path)
        while not stop.is_set():
            got = c.get(key)
            if got is not None:
                seen.append(got == big)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer) for _ in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert seen and all(seen)
    doc = json.loads(JudgeCache(tmp_path).path(key).read_text())
    assert doc["key"] == key
    assert not list(tmp_path.rglob(".tmp-*"))


def test_bad_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a cache key"):
        JudgeCache(tmp_path).path("../../etc/passwd")
