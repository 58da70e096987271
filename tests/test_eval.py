"""chunkkv eval: scoring, data readers, needle documents, grid bookkeeping, resume, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
import types

import pytest
import torch
from tests.conftest import CharTokenizer
from typer.testing import CliRunner

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.eval import data, runner, scoring
from chunkkv_cli.eval.data import Sample

# Scoring ------------------------------------------------------------------------------------------


def test_normalisation_drops_case_punctuation_and_articles():
    assert scoring.normalize_answer("  The Lens, repaired!  ") == "lens repaired"


def test_exact_and_substring_match():
    assert scoring.exact_match("Ida Brannock.", ["ida brannock"]) == 1.0
    assert scoring.exact_match("It was Ida Brannock", ["Ida Brannock"]) == 0.0
    assert scoring.substring_match("It was Ida Brannock.", ["Brannock", "nobody"]) == 1.0
    assert scoring.substring_match("Brannockville", ["Brannock"]) == 0.0  # whole words only


def test_token_f1_is_the_best_over_answers():
    assert scoring.token_f1("Ida Brannock repaired it", ["Ida Brannock"]) == pytest.approx(2 / 3)
    assert scoring.token_f1("Brannock", ["Merriwether", "Ida Brannock"]) == pytest.approx(2 / 3)
    assert scoring.token_f1("", ["x"]) == 0.0


def test_needle_value_ignores_thousands_separators():
    assert scoring.contains_value("The code is 7,294.", "7294") == 1.0
    assert scoring.contains_value("The code is 729.", "7294") == 0.0
    assert scoring.contains_value("It is AMBER-FALCON!", "amber-falcon") == 1.0


@pytest.mark.parametrize(
    ("text", "number"),
    [("so 12 + 3 = 15.", "15"), ("x\n#### 1,234", "1234"), ("#### -7.0", "-7"), ("2.5 then 4.75", "4.75"), ("none", None)],
)
def test_final_number(text, number):
    assert scoring.final_number(text) == number


def test_number_match_compares_canonical_numbers():
    assert scoring.number_match("The answer is 42.0", "42") == 1.0
    assert scoring.number_match("#### 41\nthen 42", "42") == 0.0  # the marked answer wins


# Readers ------------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_longqa_reads_both_layouts(tmp_path):
    file = write_lines(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"context": "doc", "input": "q?", "answers": ["a"], "length": 3, "_id": "lb1"}),
            "",
            json.dumps({"context": "doc2", "question": "q2?", "answers": "b"}),
        ],
    )
    first, second = data.read_longqa(file)
    assert (first.id, first.question, first.answers, first.length) == ("lb1", "q?", ["a"], 3)
    assert (second.id, second.context, second.answers, second.length) == ("3", "doc2", ["b"], None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"context": "d", "input": "q"', "not valid JSON"),
        ('["context"]', "expected a JSON object"),
        ('{"context": "d", "input": "q"}', "missing answers"),
        ('{"context": "d", "question": "q", "answers": []}', "answers must be a non-empty list"),
    ],
)
def test_longqa_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"context": "d", "question": "q", "answers": ["a"]})
    file = write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(ChunkKVError, match=rf"bad\.jsonl:2: {message}"):
        data.read_longqa(file)


def test_gsm8k_reader_and_its_errors(tmp_path):
    good = {"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}
    assert data.read_gsm8k(write_lines(tmp_path / "ok.jsonl", [json.dumps(good)]))[0].number == "2"
    bad = write_lines(tmp_path / "gsm.jsonl", [json.dumps(good), json.dumps({"question": "q", "answer": "no mark"})])
    with pytest.raises(ChunkKVError, match=r"gsm\.jsonl:2: answer does not end in '#### N'"):
        data.read_gsm8k(bad)
    with pytest.raises(ChunkKVError, match=r"gsm\.jsonl:1: expected GSM8K fields"):
        data.read_gsm8k(write_lines(tmp_path / "gsm.jsonl", [json.dumps({"question": "q"})]))


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(ChunkKVError, match="not found"):
        data.read_longqa(tmp_path / "nope.jsonl")


def test_arithmetic_problems_are_seeded_and_self_consistent():
    problems = data.arithmetic_problems(20, seed=3)
    assert problems == data.arithmetic_problems(20, seed=3) != data.arithmetic_problems(20, seed=4)
    for p in problems:
        assert scoring.gsm8k_number(p.solution) == p.number and int(p.number) > 0


# Haystack and needle ------------------------------------------------------------------------------


class WordTokenizer:
    """One token per character, decoding back to the same text (unlike CharTokenizer)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_haystack_is_deterministic_and_has_no_digits():
    text = data.haystack_text(200, seed=1)
    assert text == data.haystack_text(200, seed=1) != data.haystack_text(200, seed=2)
    assert not any(c.isdigit() for c in text)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_lands_at_its_depth_on_a_sentence_start(depth):
    tok = WordTokenizer()
    hay = data.haystack_ids(tok, 3000)
    assert len(hay) == 3000
    doc = data.insert_needle(tok, hay, 2000, depth, "NEEDLE is 42.")
    at = doc.index("NEEDLE")
    assert abs(at / len(doc) - depth) < 0.03
    if depth == 1.0:
        assert doc.endswith("NEEDLE is 42.")
    else:
        assert at == 0 or doc[at - 2 : at] in (". ", "\n ") or doc[at - 1] == "\n"
    assert len(doc) == pytest.approx(2000 + len(" NEEDLE is 42."), abs=3)


def test_haystack_from_a_short_text_repeats_it():
    hay = data.haystack_ids(WordTokenizer(), 500, text="A short story.")
    assert len(hay) == 500


def test_depth_fractions():
    assert data.depth_fractions(5) == [0, 0.25, 0.5, 0.75, 1]
    assert data.depth_fractions(1) == [0.5]
    with pytest.raises(ChunkKVError, match="--depths"):
        data.depth_fractions(0)


def test_needle_samples_cover_the_grid_and_refuse_prompts_too_long():
    tok = WordTokenizer()
    samples = data.needle_samples(tok, [100, 200], [0.0, 1.0], ("The code is 7.", "Code?", "7"))
    assert [s.id for s in samples] == ["L100-d0", "L100-d1", "L200-d0", "L200-d1"]
    assert samples[0].reference == {"value": "7"} and samples[3].meta == {"length": 200, "depth": 1.0}
    with pytest.raises(ChunkKVError, match="--lengths 200"):
        data.needle_samples(tok, [200], [0.5], ("The code is 7.", "Code?", "7"), max_prompt=150)


def test_longqa_prompts_too_long_are_cut_in_the_middle():
    tok = WordTokenizer()
    item = data.QA("x", "HEAD " + "filler " * 200 + "TAIL", "q?", ["a"])
    (sample,) = data.longqa_samples(tok, [item], max_prompt=600)
    text = tok.decode(sample.prompt)
    assert len(sample.prompt) <= 600 and sample.meta["truncated"]
    assert "HEAD" in text and "TAIL" in text


def test_manyshot_fills_each_length_with_worked_examples():
    tok = WordTokenizer()
    questions, pool = data.arithmetic_problems(2), data.arithmetic_problems(60, seed=1)
    samples = data.manyshot_samples(tok, questions, pool, [1000, 3000])
    shots = {s.id: s.meta["shots"] for s in samples}
    assert set(shots) == {"q0-L1000", "q0-L3000", "q1-L1000", "q1-L3000"}
    assert 0 < shots["q0-L1000"] < shots["q0-L3000"]
    assert samples[0].reference == {"number": questions[0].number}


# Grid bookkeeping ---------------------------------------------------------------------------------


def test_grid_points_run_fullkv_once():
    points = runner.grid_points(["chunkkv", "fullkv", "snapkv"], [0.1, 0.2])
    assert [(p.method, p.label) for p in points] == [
        ("chunkkv", "0.1"), ("chunkkv", "0.2"), ("fullkv", "1"), ("snapkv", "0.1"), ("snapkv", "0.2"),
    ]  # fmt: skip


def test_record_store_appends_reloads_and_drops_a_torn_last_line(tmp_path):
    store = runner.RecordStore(tmp_path)
    store.add({"task": "needle", "sample": "a", "method": "chunkkv", "ratio": 0.1, "score": 1.0})
    with store.path.open("a") as f:
        f.write('{"task": "needle", "sample": "b", "meth')  # interrupted mid-write
    again = runner.RecordStore(tmp_path)
    assert again.has(runner.record_key("needle", "a", "chunkkv", 0.1))
    assert len(again.records) == 1


def test_record_store_refuses_a_broken_line_in_the_middle(tmp_path):
    (tmp_path / runner.RECORDS_FILE).write_text('garbage\n{"task": "t", "sample": "s", "method": "m", "ratio": 1}\n')
    with pytest.raises(ChunkKVError, match="records.jsonl:1"):
        runner.RecordStore(tmp_path)


def test_resuming_with_different_settings_is_refused(tmp_path):
    settings = runner.Settings("needle", "tiny", ["chunkkv"], [0.1])
    runner.check_settings(tmp_path, settings)
    runner.check_settings(tmp_path, runner.Settings("needle", "tiny", ["snapkv", "fullkv"], [0.2]))  # new axes: fine
    with pytest.raises(ChunkKVError, match="different --window"):
        runner.check_settings(tmp_path, runner.Settings("needle", "tiny", ["chunkkv"], [0.1], window=8))


def test_orderings_show_scores_and_ties_and_include_fullkv():
    table = {"chunkkv": {"0.1": 80.0}, "snapkv": {"0.1": 60.0}, "h2o": {"0.1": 60.0}, "fullkv": {"1": 90.0}}
    assert runner.orderings(table, [0.1]) == {"0.1": "fullkv 90.0 > chunkkv 80.0 > snapkv 60.0 = h2o 60.0"}
    assert runner.rankings(table, [0.1]) == {"0.1": ["fullkv", "chunkkv", "snapkv", "h2o"]}


def test_jaccard_of_shared_and_per_head_indices():
    shared = {0: torch.tensor([[0, 1, 2, 3]]), 1: torch.tensor([[2, 3, 4, 5]]), 2: torch.tensor([[2, 3, 4, 5]])}
    matrix = runner.jaccard_matrix(shared)
    assert matrix[0][1] == pytest.approx(2 / 6) and matrix[1][2] == 1.0 and matrix[0][0] == 1.0
    assert runner.adjacent_mean(matrix) == pytest.approx((2 / 6 + 1) / 2)
    per_head = {0: torch.tensor([[[0, 1], [0, 1]]]), 1: torch.tensor([[[0, 1], [2, 3]]])}
    assert runner.jaccard_matrix(per_head)[0][1] == pytest.approx(0.5)  # head 0 identical, head 1 disjoint


def test_shared_h2o_selects_what_h2o_selects():
    from chunkkv_cli.compress import make_compressor

    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 90, 16, generator=gen), torch.randn(1, 2, 90, 16, generator=gen)
    memo = runner.LastLayerScores()
    for ratio in (0.2, 0.5):
        shared = runner.SharedH2O(ratio=ratio, window=8, memo=memo)
        plain = make_compressor("h2o", ratio=ratio, window=8)
        assert torch.equal(shared.select(query, key, 0, 4, 0.25), plain.select(query, key, 0, 4, 0.25))


# Running the grid on the tiny model ---------------------------------------------------------------


def tiny_samples(n=3, length=120):
    gen = torch.Generator().manual_seed(2)
    return [
        Sample(f"s{i}", torch.randint(0, 128, (length,), generator=gen).tolist(), {"value": "zz"}, {"length": length, "depth": i / 2})
        for i in range(n)
    ]


@pytest.fixture
def count_prefills(monkeypatch):
    import chunkkv_cli.generate as generate

    calls = []
    real = generate.prefill

    def counting(model, input_ids, targets, on_layer=None, **kwargs):
        calls.append(len(targets))
        return real(model, input_ids, targets, on_layer, **kwargs)

    monkeypatch.setattr(generate, "prefill", counting)
    return calls


def test_one_prefill_per_sample_feeds_the_whole_grid(model, tmp_path, count_prefills):
    settings = runner.Settings("needle", "tiny", ["chunkkv", "h2o", "fullkv"], [0.1, 0.3], window=8, max_new_tokens=3)
    store = runner.run_grid(model, CharTokenizer(), tiny_samples(), settings, tmp_path)
    assert count_prefills == [5, 5, 5]
    assert len(store.records) == 15
    results = runner.summarize(store, tiny_samples(), settings)
    assert set(results["table"]) == {"chunkkv", "h2o", "fullkv"} and set(results["table"]["fullkv"]) == {"1"}
    assert all(c["n"] == 3 for c in results["cells"])
    assert results["needle"]["lengths"] == [120] and len(results["needle"]["grid"]["h2o"]["0.3"]) == 3


def test_resume_runs_only_what_is_missing(model, tmp_path, count_prefills):
    settings = runner.Settings("needle", "tiny", ["chunkkv", "snapkv"], [0.2], window=8, max_new_tokens=3)
    first = runner.run_grid(model, CharTokenizer(), tiny_samples(), settings, tmp_path)
    lines = (tmp_path / runner.RECORDS_FILE).read_text().splitlines()
    (tmp_path / runner.RECORDS_FILE).write_text("\n".join(lines[:-1]) + "\n")  # lose the last record
    count_prefills.clear()
    again = runner.run_grid(model, CharTokenizer(), tiny_samples(), settings, tmp_path)
    assert count_prefills == [1]  # only the last sample, only the missing method
    assert _untimed(again.records) == _untimed(first.records)
    count_prefills.clear()
    settings.ratios = [0.2, 0.5]  # growing the grid adds points, keeps the old ones
    runner.run_grid(model, CharTokenizer(), tiny_samples(), settings, tmp_path)
    assert count_prefills == [2, 2, 2]


def test_budgets_share_the_grid_and_clusterkv_covering_the_prompt_answers_like_fullkv(model, tmp_path):
    settings = runner.Settings("needle", "tiny", ["clusterkv", "chunkkv", "fullkv"], [0.2, 500.0], window=8,
                               max_new_tokens=5)
    store = runner.run_grid(model, CharTokenizer(), tiny_samples(2), settings, tmp_path)
    records = {(r["sample"], r["method"], r["ratio"]): r for r in store.records.values()}
    for sample in ("s0", "s1"):
        full = records[(sample, "fullkv", 1.0)]
        assert records[(sample, "clusterkv", 500.0)]["answer"] == full["answer"]  # 500 tokens cover all 120
        assert records[(sample, "chunkkv", 500.0)]["kept_tokens"] == 120  # a budget above the prompt keeps it all
        assert records[(sample, "chunkkv", 0.2)]["kept_tokens"] == 24
        assert records[(sample, "clusterkv", 0.2)]["kept_tokens"] == 120  # recallable: nothing evicted
    results = runner.summarize(store, tiny_samples(2), settings)
    assert set(results["table"]["clusterkv"]) == {"0.2", "500"}


def test_grid_values_take_fractions_and_budgets():
    from chunkkv_cli.commands.eval import grid_values

    assert grid_values("0.1,0.2", "1024,512") == [0.1, 0.2, 1024.0, 512.0]
    assert grid_values("", "1024") == [1024.0]
    for bad in ("1.5", "x", "1", "-3"):
        with pytest.raises(ChunkKVError, match="--budgets"):
            grid_values("0.1", bad)


def _untimed(records: dict) -> dict:
    return {k: {f: v for f, v in r.items() if not f.endswith("seconds")} for k, r in records.items()}


def test_similarity_records_layer_by_layer_jaccard(model, tmp_path):
    settings = runner.Settings("similarity", "tiny", ["chunkkv", "snapkv"], [0.2], window=8)
    store = runner.run_grid(model, CharTokenizer(), tiny_samples(2), settings, tmp_path)
    results = runner.summarize(store, tiny_samples(2), settings)
    matrix = results["similarity"]["matrix"]["snapkv"]["0.2"]
    assert len(matrix) == 4 and all(matrix[i][i] == 1.0 for i in range(4))
    assert 0 <= results["similarity"]["adjacent"]["chunkkv"]["0.2"] <= 1


# The command --------------------------------------------------------------------------------------


@pytest.fixture
def tiny_cli(model, monkeypatch):
    import chunkkv_cli.model as model_module

    profile = types.SimpleNamespace(name="tiny", max_context=4096)
    monkeypatch.setattr(
        model_module, "load_model", lambda spec, device="auto", **kw: model_module.Loaded(model, CharTokenizer(), profile, torch.device("cpu"))
    )

    def invoke(*args):
        from chunkkv_cli.cli import app

        return CliRunner().invoke(app, ["eval", *args])

    return invoke


def test_eval_needle_json_and_files(tiny_cli, tmp_path):
    out = tmp_path / "run"
    result = tiny_cli("needle", "--lengths", "150,250", "--depths", "2", "--methods", "chunkkv,streamingllm,fullkv",
                      "--ratios", "0.2", "--max-new-tokens", "2", "--window", "8", "--out", str(out), "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout[result.stdout.index("{") :])
    assert results["samples"] == 4 and set(results["ranking"]["0.2"]) == {"chunkkv", "streamingllm", "fullkv"}
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]
    assert len((out / "records.jsonl").read_text().splitlines()) == 12
    assert (out / "needle.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "chunkkv,bogus"], "unknown method 'bogus'"),
        (["--ratios", "0.1,1.5"], "outside (0, 1]"),
        (["--ratios", "abc"], "not a number"),
        (["--lengths", "2x"], "--lengths '2x' is not a token count"),
        (["--needle", "The key is 5."], "go together"),
        (["--methods", "chunkkv,fullkv", "--param", "reach=8"], "none of the methods chunkkv, fullkv takes 'reach'"),
        (["--methods", "kvzip", "--param", "reach=x"], "kvzip: reach must be of type int"),
    ],
)
def test_eval_rejects_bad_options(tiny_cli, tmp_path, args, message):
    result = tiny_cli("needle", *args, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert message in result.output


def test_longqa_without_data_uses_the_bundled_sample():
    from chunkkv_cli.commands.eval import _qa_items

    items, source = _qa_items("longqa", None)
    assert len(items) == 12 and source == {"data": "samples/lighthouse.md + samples/questions.jsonl"}
    assert all("Tollivar" in item.context for item in items)


def test_question_agnostic_runs_compress_the_document_before_the_question(model, tmp_path, monkeypatch):
    import chunkkv_cli.generate as generate

    seen = []
    real = generate.prefill

    def recording(model, input_ids, targets, on_layer=None, **kwargs):
        seen.append(input_ids.shape[1])
        return real(model, input_ids, targets, on_layer, **kwargs)

    monkeypatch.setattr(generate, "prefill", recording)
    samples = [replace(s, split=100) for s in tiny_samples()]
    settings = runner.Settings("needle", "tiny", ["kvzip", "chunkkv", "fullkv"], [0.3], window=8, max_new_tokens=3,
                               question_agnostic=True)  # fmt: skip
    store = runner.run_grid(model, CharTokenizer(), samples, settings, tmp_path)
    assert seen == [100, 100, 100] and len(store.records) == 9
    assert all(r["prompt_tokens"] == 120 for r in store.records.values())
    aware = runner.Settings("needle", "tiny", ["fullkv"], [1.0], window=8, max_new_tokens=3)
    full = runner.run_grid(model, CharTokenizer(), samples, aware, tmp_path / "aware")
    same = {r["sample"]: r["answer"] for r in store.records.values() if r["method"] == "fullkv"}
    assert same == {r["sample"]: r["answer"] for r in full.records.values()}  # the full cache loses nothing by the split


def test_a_method_parameter_reaches_only_the_methods_that_take_it():
    settings = runner.Settings("needle", "tiny", ["kvzip", "chunkkv"], [0.3], params=["reach=64", "pool_kernel=3"])
    kvzip, chunkkv = (settings.compression(runner.Point(m, 0.3)).compressor() for m in ("kvzip", "chunkkv"))
    assert kvzip.reach == 64 and chunkkv.pool_kernel == 3
    assert "params" in settings.identity()  # a resumed run with other parameters is refused


def test_question_agnostic_is_for_tasks_with_a_question():
    from chunkkv_cli.commands.eval import _agnostic_task

    with pytest.raises(ChunkKVError, match="needle and longqa"):
        _agnostic_task(True, "manyshot")
