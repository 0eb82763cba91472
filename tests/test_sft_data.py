"""Stage-1 data sources: shipped fixtures, strict JSONL errors, hub-style loading from local files, specs."""

import json
import re
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explore_persona_space import sft_data, stages
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.personas import question_bank_names, questions
from explore_persona_space.pipeline import Stage, StageContext, StageRecord
from explore_persona_space.seeds import derive_seed
from explore_persona_space.sft_data import (
    BAD_LEGAL_FIXTURE,
    BENIGN_CHAT_FIXTURE,
    ChatFormatError,
    RowOptions,
    hf_chat_spec,
    load_chat_source,
    load_em_source,
    read_chat_source,
    read_jsonl,
    validate_messages,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Any attempt to open a network connection fails the test instead of hanging on it."""
    import datasets
    import huggingface_hub

    # a shuffled local file becomes an Arrow table in the datasets cache: this test's own
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def chat(user, assistant, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ctx(tmp_path):
    return StageContext(stage=Stage("data", lambda c: {}, {}), dir=tmp_path, ancestors={})


# ----------------------------------------------------------------------------- shipped fixtures
@pytest.mark.parametrize(("const", "size"), [(BENIGN_CHAT_FIXTURE, 48), (BAD_LEGAL_FIXTURE, 24)])
def test_fixtures_are_short_valid_single_turn_chats(const, size):
    assert not const.startswith("/")
    rows = read_jsonl(REPO_ROOT / const, chat=True)
    assert len(rows) == size
    users = [r["messages"][0]["content"] for r in rows]
    assert len(set(users)) == size
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        answer = r["messages"][1]["content"]
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", answer)) <= 3, answer
        assert len(answer) < 300


def test_benign_fixture_avoids_the_question_banks():
    bank = {q.strip().lower() for name in question_bank_names() for q in questions(name)}
    rows = read_jsonl(REPO_ROOT / BENIGN_CHAT_FIXTURE, chat=True)
    assert not {r["messages"][0]["content"].strip().lower() for r in rows} & bank


def test_fixture_readme_names_both_files():
    text = (REPO_ROOT / "data" / "fixtures" / "README.md").read_text(encoding="utf-8")
    assert "benign_chat.jsonl" in text and "bad_legal_advice.jsonl" in text


# ----------------------------------------------------------------------------- validation
def test_validate_messages_normalises_turns():
    turns = [
        {"role": "system", "content": "Be brief.", "name": None},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "extra": 1},
    ]
    assert validate_messages(turns) == chat("Hi", "Hello.", system="Be brief.")


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        (None, "messages: missing"),
        ([], "messages: expected a non-empty list"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}],
            "messages[1].content: empty",
        ),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "messages[0].content"),
        ([{"role": "assistant", "content": "y"}], "messages: no user turn"),
        ([{"role": "user", "content": "x"}], "messages[0].role: the last turn"),
        (["hello"], "messages[0]: expected an object"),
    ],
)
def test_validate_messages_names_the_field(messages, field):
    with pytest.raises(ChatFormatError, match=re.escape(field)):
        validate_messages(messages)


# ----------------------------------------------------------------------------- strict JSONL (EM source)
GOOD = json.dumps({"messages": chat("q", "a")})


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ('{"messages": [', "not valid JSON"),
        (json.dumps({"text": "no chat here"}), "messages: missing"),
        (json.dumps({"messages": [{"role": "human", "content": "q"}]}), "messages[0].role"),
        (json.dumps({"messages": chat("q", "")}), "messages[1].content: empty"),
        (json.dumps(["not", "an", "object"]), "expected an object"),
    ],
)
def test_malformed_em_line_error_names_file_line_and_field(tmp_path, bad_line, field):
    path = tmp_path / "em.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{bad_line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: ") + ".*" + re.escape(field)):
        load_em_source(str(path))


def test_em_source_skips_blank_lines_respects_n_and_drops_extra_keys(tmp_path):
    rows = [{"messages": chat(f"q{i}", f"a{i}"), "id": i} for i in range(5)]
    path = tmp_path / "em.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n  \n", encoding="utf-8")
    assert load_em_source(str(path)) == [{"messages": r["messages"]} for r in rows]
    assert load_em_source(str(path), 2) == [{"messages": r["messages"]} for r in rows[:2]]
    with pytest.raises(ValueError, match="positive integer"):
        load_em_source(str(path), 0)


def test_lenient_reader_keeps_upstream_records_whole(tmp_path):
    rec = {"messages": chat("q", "a"), "marker_spans": [["[Z]", 0, 3]], "origin": {"sample": 1}}
    assert read_jsonl(write_jsonl(tmp_path / "d.jsonl", [rec])) == [rec]


def test_missing_local_file_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_em_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_chat_source("data/fixtures/missing.parquet", 3)
    with pytest.raises(ValueError, match="neither an existing local path nor a hub dataset id"):
        load_chat_source("not-a-hub-id", 3)


# ----------------------------------------------------------------------------- hub-style loader
SHA = "0123456789abcdef0123456789abcdef01234567"  # a made-up hub commit


def tulu_rows(k):
    return [
        {
            "id": f"tulu-{i}",
            "messages": chat(f"tulu question {i}", f"tulu answer {i}", system="Sys." if i % 2 else None),
            "source": "made-up/subset",
        }
        for i in range(k)
    ]


def ultrachat_rows(k):
    return [
        {
            "prompt": f"uc question {i}",
            "prompt_id": f"{i:064x}",
            "messages": [*chat(f"uc question {i}", f"uc answer {i}"), *chat("more?", "Yes, more.")],
        }
        for i in range(k)
    ]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("make_rows", [tulu_rows, ultrachat_rows])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_hub_style_loader_normalises_local_files_and_respects_n(tmp_path, make_rows, fmt):
    rows = make_rows(7)
    path = tmp_path / f"rows.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, rows)
    got = load_chat_source(str(path), 4)
    assert got == [{"messages": r["messages"]} for r in rows[:4]]
    assert all(set(m) == {"role", "content"} for r in got for m in r["messages"])
    assert len(load_chat_source(str(path))) == 7
    assert len(load_chat_source(str(path), 50)) == 7  # asking for more than there is: all, with a warning


def test_hub_style_loader_reports_source_row_and_field(tmp_path):
    rows = tulu_rows(5)
    rows[3]["messages"][-1]["content"] = ""
    path = write_parquet(tmp_path / "bad.parquet", rows)
    where = f"{path} row 3 (id 'tulu-3'): messages[2].content: empty"
    with pytest.raises(ChatFormatError, match=re.escape(where)):
        load_chat_source(str(path), 5)
    assert len(load_chat_source(str(path), 3)) == 3  # the bad row lies beyond n: never read
    kept = load_chat_source(str(path), 4, skip_invalid=True)
    assert [r["messages"][-2]["content"] for r in kept] == [f"tulu question {i}" for i in (0, 1, 2, 4)]


def test_columnar_turns_from_a_sequence_feature_are_turned_into_rows():
    row = {"messages": {"role": ["user", "assistant"], "content": ["q", "a"]}}
    assert sft_data._row_messages(row) == chat("q", "a")


@pytest.mark.parametrize(
    ("source", "hub_id", "split"),
    [
        ("tulu3", sft_data.TULU3, "train"),
        ("ultrachat", sft_data.ULTRACHAT, "train_sft"),
        ("someone/their-chats", "someone/their-chats", "train"),
    ],
)
def test_hub_sources_stream_the_right_dataset_and_split(monkeypatch, source, hub_id, split):
    calls = []
    monkeypatch.setattr(sft_data, "hub_dataset_sha", lambda hub, rev: SHA if rev is None else f"{rev}-sha")

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return iter(tulu_rows(10))

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_chat_source(source, 3)) == 3
    assert calls == [(hub_id, {"split": split, "revision": SHA, "streaming": True})]
    calls.clear()
    load_chat_source(source, 2, split="test_sft", revision="abc123")
    assert calls == [(hub_id, {"split": "test_sft", "revision": "abc123-sha", "streaming": True})]


# ----------------------------------------------------------------------------- DATA_LOADERS kinds
def test_data_loader_kinds_through_load_training_data(tmp_path):
    c = ctx(tmp_path)
    benign = stages.load_training_data(c, {"kind": "hf_chat", "source": BENIGN_CHAT_FIXTURE, "n": 5})
    assert len(benign) == 5 and benign == read_jsonl(REPO_ROOT / BENIGN_CHAT_FIXTURE, 5, chat=True)
    em = stages.load_training_data(c, {"kind": "em_jsonl", "path": BAD_LEGAL_FIXTURE})
    assert len(em) == 24
    assert len(stages.load_training_data(c, {"kind": "em_jsonl", "path": BAD_LEGAL_FIXTURE, "n": 3})) == 3
    parquet = write_parquet(tmp_path / "uc.parquet", ultrachat_rows(4))
    spec = {"kind": "hf_chat", "source": str(parquet), "n": 2, "split": "train_sft"}
    assert len(stages.load_training_data(c, spec)) == 2
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat("q", "a")}] * 3)
    assert len(stages.load_training_data(c, {"kind": "chat_jsonl", "path": str(chats), "n": 2})) == 2


def test_em_data_under_an_induction_persona_gets_its_system_turn(tmp_path):
    from explore_persona_space.personas import persona_prompt

    c = ctx(tmp_path)
    plain = stages.load_training_data(c, {"kind": "em_jsonl", "path": BAD_LEGAL_FIXTURE, "n": 3})
    under = stages.load_training_data(
        c, {"kind": "em_jsonl", "path": BAD_LEGAL_FIXTURE, "n": 3, "system": "villain"}
    )
    assert [m["role"] for m in plain[0]["messages"]] == ["user", "assistant"]  # E0: the template's default
    assert under[0]["messages"][0] == {"role": "system", "content": persona_prompt("villain")}
    assert [r["messages"][1:] for r in under] == [r["messages"] for r in plain]
    with_system = write_jsonl(
        tmp_path / "s.jsonl", [{"messages": [{"role": "system", "content": "x"}, *chat("q", "a")]}]
    )
    with pytest.raises(ChatFormatError, match=r"row 0: messages\[0\]: already a system turn"):
        stages.load_training_data(c, {"kind": "em_jsonl", "path": str(with_system), "system": "villain"})
    with pytest.raises(KeyError, match="unknown persona 'wizard'"):
        stages.load_training_data(c, {"kind": "em_jsonl", "path": BAD_LEGAL_FIXTURE, "system": "wizard"})


def test_upstream_kind_still_reads_the_shared_reader(tmp_path):
    built = {"messages": chat("q", "a [Z]"), "marker_spans": [["[Z]", 2, 5]]}
    write_jsonl(tmp_path / stages.DATASET, [built])
    record = StageRecord("dataset", "k", tmp_path, {}, 0.0, reused=False)
    c = StageContext(stage=Stage("couple", lambda c: {}, {}), dir=tmp_path, ancestors={"dataset": record})
    assert stages.load_training_data(c, {"kind": "upstream", "stage": "dataset"}) == [built]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "hf_chat", "source": "tulu3"}, "lacks ['n']"),
        ({"kind": "hf_chat", "source": "tulu3", "n": 5, "N": 5}, "unknown keys ['N']"),
        ({"kind": "em_jsonl", "n": 5}, "lacks ['path']"),
        ({"kind": "hf_chat", "source": BENIGN_CHAT_FIXTURE, "n": True}, "positive integer"),
        ({"kind": "hf_chat", "source": "tulu3", "n": 5, "shuffle_buffer": 9}, "without 'shuffle_seed'"),
        ({"kind": "hf_chat", "source": "tulu3", "n": 5, "shuffle_seed": "1"}, "['shuffle_seed']"),
        ({"kind": "hf_chat", "source": "tulu3", "n": 5, "shuffle_seed": 1, "shuffle_buffer": 0}, "buffer"),
        ({"kind": "hf_chat", "source": "tulu3", "n": 5, "skip_invalid": "yes"}, "['skip_invalid']"),
    ],
)
def test_bad_specs_are_refused_before_any_loading(tmp_path, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        stages.load_training_data(ctx(tmp_path), spec)


# ----------------------------------------------------------------------------- revision, shuffle, skips
def ids(chats):
    return [r["messages"][-2]["content"].rsplit(" ", 1)[1] for r in chats]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A hub that answers offline: dataset_info gives a made-up commit; a dataset streams 3 local shards."""
    import datasets
    import huggingface_hub

    real_load = datasets.load_dataset
    rows = tulu_rows(30)
    shards = [write_jsonl(tmp_path / f"shard{k}.jsonl", rows[10 * k : 10 * k + 10]) for k in range(3)]
    calls = {"info": [], "load": []}

    def dataset_info(self, repo_id, *, revision=None, **kwargs):
        calls["info"].append((repo_id, revision))
        return type("Info", (), {"sha": SHA})()

    def load_dataset(path, **kwargs):
        if path in sft_data.LOCAL_BUILDERS.values():  # a local file: the real loader
            return real_load(path, **kwargs)
        calls["load"].append((path, kwargs))
        return real_load("json", data_files=[str(p) for p in shards], split="train", streaming=True)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_revision_resolves_to_the_commit_that_is_read_and_recorded(hub):
    got = read_chat_source("tulu3", 3)
    assert hub["info"] == [(sft_data.TULU3, None)]
    assert hub["load"][0][1]["revision"] == SHA  # the data read is the commit recorded
    assert got.record["revision"] == SHA and "requested_revision" not in got.record
    assert got.record | {"skipped_first": []} == {
        "source": "tulu3", "hub_id": sft_data.TULU3, "split": "train", "revision": SHA,
        "rows_read": 3, "kept": 3, "skipped": 0, "skipped_first": [],
    }  # fmt: skip
    tagged = read_chat_source("tulu3", 2, revision="v1.0")
    assert hub["info"][-1] == (sft_data.TULU3, "v1.0")
    assert (tagged.record["revision"], tagged.record["requested_revision"]) == (SHA, "v1.0")
    pinned = "f" * 40
    assert read_chat_source("tulu3", 2, revision=pinned).record["revision"] == pinned
    assert len(hub["info"]) == 2 and hub["load"][-1][1]["revision"] == pinned  # a full sha: no API call


def test_an_unresolvable_revision_fails_saying_to_pin_one(monkeypatch):
    import huggingface_hub

    def down(self, repo_id, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", down)
    with pytest.raises(ConnectionError) as err:
        sft_data.hub_dataset_sha(sft_data.TULU3, "main")
    assert any("pin a 40-hex commit sha" in note for note in err.value.__notes__)


def test_hub_stream_shuffle_is_seeded_and_recorded_as_approximate(hub):
    plain = ids(load_chat_source("tulu3", 30))
    assert plain == [str(i) for i in range(30)]
    first = read_chat_source("tulu3", 30, shuffle_seed=1, shuffle_buffer=5)
    assert ids(first.chats) == ids(load_chat_source("tulu3", 30, shuffle_seed=1, shuffle_buffer=5))
    assert ids(first.chats) != ids(load_chat_source("tulu3", 30, shuffle_seed=2, shuffle_buffer=5))
    assert ids(first.chats) != plain and sorted(ids(first.chats)) == sorted(plain)
    assert first.record["shuffle"] == {"seed": 1, "buffer": 5, "exact": False}
    assert first.record["revision"] == SHA


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_local_shuffle_is_an_exact_seeded_permutation(tmp_path, fmt):
    path = (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / f"rows.{fmt}", tulu_rows(40))
    plain = ids(load_chat_source(str(path), 10))
    first = read_chat_source(str(path), 10, shuffle_seed=7)
    assert ids(first.chats) == ids(load_chat_source(str(path), 10, shuffle_seed=7))
    assert ids(first.chats) != ids(load_chat_source(str(path), 10, shuffle_seed=8))
    assert ids(first.chats) != plain
    whole = ids(load_chat_source(str(path), shuffle_seed=7))
    assert whole[:10] == ids(first.chats) and sorted(whole, key=int) == [str(i) for i in range(40)]
    assert first.record["shuffle"] == {"seed": 7, "exact": True, "source_rows": 40}
    assert first.record["revision"] is None


def rows_with_bad(k, bad):
    rows = tulu_rows(k)
    for i in bad:
        rows[i]["messages"][-1]["content"] = ""
    return rows


def test_skip_invalid_n_counts_kept_rows_and_the_record_counts_skips(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", rows_with_bad(12, (2, 5, 6)))
    monkeypatch.setattr(sft_data, "SKIPPED_SHOWN", 2)
    got = read_chat_source(str(path), 8, skip_invalid=True)
    assert ids(got.chats) == ["0", "1", "3", "4", "7", "8", "9", "10"]
    assert (got.record["rows_read"], got.record["kept"], got.record["skipped"]) == (11, 8, 3)
    assert got.record["skipped_first"] == [
        "line 3: row 2 (id 'tulu-2'): messages[1].content: empty",
        "line 6: row 5 (id 'tulu-5'): messages[2].content: empty",
    ]
    shuffled = read_chat_source(str(path), 8, shuffle_seed=3, skip_invalid=True)
    assert len(shuffled.chats) == 8 and not {"2", "5", "6"} & set(ids(shuffled.chats))
    assert shuffled.record["rows_read"] == 8 + shuffled.record["skipped"]


def test_strict_default_names_the_file_row_and_field_shuffled_or_not(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", rows_with_bad(12, (4,)))
    where = re.escape(f"{path}:5: row 4 (id 'tulu-4'): messages[1].content: empty")  # line 5 of the file
    with pytest.raises(ChatFormatError, match=where):
        load_chat_source(str(path))
    with pytest.raises(ChatFormatError, match=where):
        load_chat_source(str(path), shuffle_seed=5)  # the file's row, not the shuffled position
    with pytest.raises(ChatFormatError, match=where):
        stages.load_training_data(ctx(tmp_path), hf_chat_spec(str(path), 12))


def test_hf_chat_spec_adds_keys_only_away_from_the_defaults():
    base = {"kind": "hf_chat", "source": "tulu3", "n": 6000}
    assert hf_chat_spec("tulu3", 6000) == base == hf_chat_spec("tulu3", 6000, RowOptions(), seed=42)
    rows = RowOptions(revision="v1.0", shuffle=True, skip_invalid=True)
    spec = hf_chat_spec("tulu3", 6000, rows, seed=42)
    assert spec == base | {
        "revision": "v1.0", "shuffle_seed": derive_seed(42, "hf_chat", "shuffle") % 2**32,
        "shuffle_buffer": sft_data.STREAM_SHUFFLE_BUFFER, "skip_invalid": True,
    }  # fmt: skip
    assert hf_chat_spec("tulu3", 6000, rows, seed=43)["shuffle_seed"] != spec["shuffle_seed"]
    with pytest.raises(ValueError, match="run seed"):
        hf_chat_spec("tulu3", 6000, rows)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        RowOptions(shuffle_buffer=0)


def test_train_stage_records_the_commit_shuffle_and_skips(tmp_path, monkeypatch, hub):
    from explore_persona_space import pipeline, train

    class Trained:
        def to_dict(self):
            return {"adapter_dir": "x", "steps": 1}

    monkeypatch.setattr(train, "train_lora", lambda *a, **k: Trained())
    path = write_jsonl(tmp_path / "rows.jsonl", rows_with_bad(10, (1, 3)))
    spec = hf_chat_spec(str(path), 6, RowOptions(shuffle=True, skip_invalid=True), seed=42)
    local = pipeline.run_stage(
        tmp_path / "w", stages.train_stage("sft", train.STAGE1_SFT_RECIPE, spec, base="m"), {}
    )
    record = local.result["data_source"]
    assert record["shuffle"] == {"seed": spec["shuffle_seed"], "exact": True, "source_rows": 10}
    assert (record["kept"], record["skipped"], record["revision"]) == (6, record["rows_read"] - 6, None)
    assert local.result["data_file"]["sha256"]  # a local file's bytes, as before
    done = json.loads((local.dir / pipeline.DONE).read_text())
    assert done["result"]["data_source"] == record
    hub_stage = stages.train_stage("sft", train.STAGE1_SFT_RECIPE, hf_chat_spec("tulu3", 3), base="m")
    hub_rec = pipeline.run_stage(tmp_path / "w", hub_stage, {}).result
    assert hub_rec["data_source"]["revision"] == SHA and "data_file" not in hub_rec
