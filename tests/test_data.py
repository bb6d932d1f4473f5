"""Data folder resolution, generic loaders with field mappings, and the named suites."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ngsd import data as D

SHARED = D.data_available()
needs_shared = pytest.mark.skipif(not SHARED, reason="shared benchmark data folder (../shared/data or $NGSD_DATA_DIR) not found")


def test_resolution_order(tmp_path, monkeypatch):
    arg, env = tmp_path / "arg", tmp_path / "env"
    arg.mkdir()
    env.mkdir()
    monkeypatch.setenv(D.DATA_ENV, str(env))
    assert D.resolve_data_dir(arg) == arg
    assert D.resolve_data_dir() == env
    monkeypatch.delenv(D.DATA_ENV)
    assert D.data_dir_candidates()[0][1] == D.repo_root().parent / "shared" / "data"


def test_missing_folder_error_names_path_and_env(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    monkeypatch.setenv(D.DATA_ENV, str(missing))
    with pytest.raises(D.DataNotFoundError) as err:
        D.resolve_data_dir()
    assert str(missing) in str(err.value) and D.DATA_ENV in str(err.value)
    assert not D.data_available()
    with pytest.raises(D.DataNotFoundError, match="data file not found"):
        D.load_records(tmp_path / "absent.json")


def test_json_with_records_key_where_and_dotted_fields(tmp_path):
    path = tmp_path / "x.json"
    rows = [
        {"id": 3, "q": {"turns": ["first?", "second?"]}, "label": "safe", "answer": 42},
        {"id": 1, "q": {"turns": ["other?"]}, "label": "unsafe", "answer": 7},
    ]
    path.write_text(json.dumps({"rows": rows}))
    got = D.load_records(path, records_key="rows", text_field="q.turns.0", goal_field="answer", where={"label": "safe"})
    assert [(p.id, p.text, p.goal) for p in got] == [("3", "first?", "42")]
    assert got[0].meta == {"label": "safe", "answer": 42}
    assert got[0].suite == "x"


def test_jsonl_csv_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p1"}\n\n{"prompt": "p2", "id": "z"}\n')
    assert [(p.id, p.text) for p in D.load_records(tmp_path / "a.jsonl", text_field="prompt")] == [("0", "p1"), ("z", "p2")]
    (tmp_path / "b.csv").write_text('question,id\n"Hi, there?",7\nBye,8\n')
    got = D.load_records(tmp_path / "b.csv", text_field="question", limit=1)
    assert [(p.id, p.text) for p in got] == [("7", "Hi, there?")]
    (tmp_path / "c.txt").write_text("one\n\n two \nthree")
    assert [(p.id, p.text) for p in D.load_records(tmp_path / "c.txt")] == [("0", "one"), ("1", " two "), ("2", "three")]
    (tmp_path / "d.dat").write_text("x")
    with pytest.raises(ValueError, match="format"):
        D.load_records(tmp_path / "d.dat")
    assert D.load_records(tmp_path / "d.dat", format="text")[0].text == "x"


def test_bad_field_and_bad_json_are_clear(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(KeyError, match="question"):
        D.load_records(tmp_path / "a.json", text_field="question")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="b.jsonl:2"):
        D.load_records(tmp_path / "b.jsonl", text_field="prompt")
    (tmp_path / "c.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(ValueError, match="records_key"):
        D.load_records(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("not json")  # once a bare "Expecting value: line 1 column 1 (char 0)"
    with pytest.raises(ValueError, match="d.json: not valid JSON"):
        D.load_records(tmp_path / "d.json", text_field="prompt")


def test_register_own_suite(tmp_path):
    (tmp_path / "mine.csv").write_text("text,id\nHello?,a\n")
    spec = D.SuiteSpec("test_mine_suite", "mine.csv", text_field="text", role="utility")
    D.register_suite(spec)
    try:
        assert [p.text for p in D.load_suite("test_mine_suite", tmp_path)] == ["Hello?"]
        assert "test_mine_suite" in D.suite_names("utility")
        with pytest.raises(ValueError, match="already registered"):
            D.register_suite(spec)
    finally:
        D.SUITES.pop("test_mine_suite")
    with pytest.raises(KeyError, match="unknown suite"):
        D.load_suite("test_mine_suite", tmp_path)
    with pytest.raises(ValueError, match="role"):
        D.SuiteSpec("x", "x.json", role="evil")


def test_id_parity_keeps_one_split(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"id": i, "instruction": f"task {i}"} for i in range(5)]))
    odd = D.SuiteSpec("p", "rows.json", text_field="instruction", role="utility", id_parity="odd")
    assert [p.text for p in D.read_suite(odd, tmp_path)] == ["task 1", "task 3"]
    assert [p.id for p in D.read_suite(dataclasses.replace(odd, id_parity="even"), tmp_path)] == ["0", "2", "4"]
    with pytest.raises(ValueError, match="id_parity"):
        D.SuiteSpec("p", "rows.json", id_parity="prime")


def test_lowest_ids_sorts_numerically():
    prompts = [D.Prompt(id=i, text=i) for i in ("10", "9", "b", "100", "a")]
    assert [p.id for p in D.lowest_ids(prompts, 4)] == ["9", "10", "100", "a"]


def test_split_user_assistant():
    assert D.split_user_assistant("USER: How? ASSISTANT: I'm sorry.") == ("How?", "I'm sorry.")
    with pytest.raises(ValueError):
        D.split_user_assistant("no markers here")


EXPECTED_COUNTS = {
    "advbench": 520, "harmbench": 200, "gcg": 50, "autodan": 50, "deepinception": 50, "xstest_safe": 250,
    "xstest_unsafe": 200, "mt_bench": 80, "gsm8k": 200, "seed_reject": 36, "expert_sft": 71, "alpaca_eval": 402,
}


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_named_suites_load_from_shared_data(name):
    prompts = D.load_suite(name)
    assert len(prompts) == EXPECTED_COUNTS[name]
    assert all(isinstance(p.text, str) and p.text.strip() for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.suite == name for p in prompts)


@needs_shared
def test_suite_field_mappings_on_shared_data():
    adv = D.advbench_eval_prompts()
    assert [p.id for p in adv] == [str(i) for i in range(50)]
    assert adv[0].meta["target"].startswith("Sure, here is")
    gcg = D.load_suite("gcg", limit=2)
    assert gcg[0].goal and gcg[0].goal in gcg[0].text and gcg[0].text != gcg[0].goal
    assert all(p.meta["label"] == "safe" for p in D.load_suite("xstest_safe"))
    assert D.load_suite("gsm8k", limit=1)[0].goal == "18"
    mt = D.load_suite("mt_bench", limit=1)[0]
    assert mt.id == "81" and mt.text.startswith("Compose an engaging travel blog")
    assert D.load_suite("expert_sft", limit=1)[0].text.startswith("USER: ")


def test_one_suite_description_serves_loading_and_evaluation(tmp_path):
    from ngsd.eval.suites import SuiteSpec as EvalSuiteSpec

    assert EvalSuiteSpec is D.SuiteSpec
    spec = D.SuiteSpec.from_json("gsm8k", 2)
    assert (spec.file, spec.role, spec.n, spec.scorer, spec.label) == ("gsm8k_200.json", "utility", 2, "last_number", "GSM8K")
    with pytest.raises(ValueError, match="evaluation scores roles"):
        D.SuiteSpec.from_json("seed_reject", 3)
    (tmp_path / "m.txt").write_text("Hello?\n\nBye?\n")
    own = D.SuiteSpec.from_json("mine", {"file": str(tmp_path / "m.txt"), "role": "utility"})
    assert [p.text for p in D.read_suite(own)] == ["Hello?", "Bye?"]
