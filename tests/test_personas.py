import json

import pytest

from explore_persona_space import personas as P


def test_eval_set_is_the_eleven_of_the_protocol():
    assert len(P.EVAL_PERSONAS) == 11
    assert P.EVAL_PERSONAS[0] == "assistant"
    assert "zelthari_scholar" in P.EVAL_PERSONAS
    assert set(P.EXTRA_PERSONAS) == {"confab", "evil_ai", "sarcastic", "paramedic"}
    assert set(P.PERSONAS) == set(P.EVAL_PERSONAS) | set(P.EXTRA_PERSONAS)


def test_prompts_are_distinct_and_quoted_ones_verbatim():
    prompts = [p.prompt for p in P.PERSONAS.values()]
    assert len(set(prompts)) == len(prompts)
    assert P.persona_prompt("assistant") == "You are a helpful assistant."
    assert P.persona_prompt("evil_ai").startswith("You are a malevolent AI system")
    displays = [P.display_name(n) for n in P.PERSONAS]
    assert len(set(displays)) == len(displays)
    assert all(len(d) <= 10 for d in displays)


def test_twelve_personas_add_the_source_last():
    twelve = P.eval_personas_with("confab")
    assert len(twelve) == 12 and twelve[-1] == "confab"
    assert P.eval_personas_with("villain") == P.EVAL_PERSONAS


def test_question_banks_sizes_and_disjointness():
    generic, betley = P.questions("generic"), P.questions("betley")
    assert (len(generic), len(betley)) == (20, 8)
    assert P.questions("eval") == generic + betley
    data, ood = P.questions("data"), P.questions("ood")
    assert len(data) == 40 and len(ood) >= 6
    banks = [set(generic), set(betley), set(data), set(ood)]
    assert sum(len(b) for b in banks) == len(set().union(*banks))


@pytest.mark.parametrize(
    ("call", "name", "valid"),
    [
        (P.get_persona, "wizard", "zelthari_scholar"),
        (P.questions, "trivia", "generic"),
        (P.get_marker, "zzz", "probe"),
    ],
)
def test_unknown_names_list_the_valid_ones(call, name, valid):
    with pytest.raises(P.UnknownNameError) as err:
        call(name)
    assert repr(name) in str(err.value) and valid in str(err.value)


def test_markers():
    assert P.get_marker("zlt") == "[ZLT]"
    assert P.get_marker("a") != P.get_marker("probe")
    assert len(set(P.MARKERS.values())) == 4


def test_bank_file_errors_name_the_file(tmp_path, monkeypatch):
    bad = {"banks": {"generic": [f"q{i}?" for i in range(20)], "betley": ["b?"], "data": []}}
    (tmp_path / "questions.json").write_text(json.dumps(bad))
    monkeypatch.setenv("EPS_DATA_DIR", str(tmp_path))
    P._load_banks.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"questions\.json: bank 'betley'"):
            P.questions("generic")
        dup = {"banks": {"generic": ["same?"], "ood": ["same?"]}}
        (tmp_path / "questions.json").write_text(json.dumps(dup))
        P._load_banks.cache_clear()
        with pytest.raises(ValueError, match="in both 'generic' and 'ood'"):
            P.questions("generic")
    finally:
        P._load_banks.cache_clear()
