"""elastic.evaluate and elastic.datasets on tiny random models, against independent references."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import elastic
from elastic import datasets, evaluate
from elastic.metrics import rouge_l
from tiny import qwen2vl_inputs, tiny_llama, tiny_llava, tiny_qwen2vl

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_llava(seed=0)
    return elastic.attach(model), processor


def _samples():
    return datasets.load_mmvet(FIXTURES / "mmvet.json", IMAGES) + datasets.load_llava(FIXTURES / "llava.json", IMAGES)


def plain_nll(model, inputs, answer):
    """Reference: one cache-free forward over prompt + answer, NLL of the answer tokens."""
    T = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], answer.view(1, -1)], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer).view(1, -1)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, **extra).logits[0, T - 1 : -1].float()
    return float(-logits.log_softmax(-1).gather(1, answer.view(-1, 1)).sum())


# ---------------------------------------------------------------- PPL

def test_full_ppl_equals_plain_forward_llava(llava):
    model, processor = llava
    for sample in _samples():
        inputs, answer = evaluate.prepare(model, processor, sample)
        assert len(answer) > 1
        nll, n = evaluate.teacher_forced_nll(model, inputs, answer, elastic.make_cache("full"))
        assert n == len(answer)
        assert nll == pytest.approx(plain_nll(model, inputs, answer), rel=1e-4, abs=1e-4)


def test_full_ppl_equals_plain_forward_llama_and_qwen2vl():
    # Llama: 1-D positions; Qwen2-VL: 3-D mRoPE positions shifted by the image's rope delta.
    torch.manual_seed(0)
    llama = elastic.attach(tiny_llama())
    ids = torch.randint(4, 60, (1, 40))
    answer = torch.randint(4, 60, (12,))
    nll, _ = evaluate.teacher_forced_nll(llama, {"input_ids": ids}, answer, elastic.make_cache("full"))
    assert nll == pytest.approx(plain_nll(llama, {"input_ids": ids}, answer), rel=1e-4)

    qwen = elastic.attach(tiny_qwen2vl())
    inputs = qwen2vl_inputs()
    answer = torch.randint(3, 100, (12,))
    nll, _ = evaluate.teacher_forced_nll(qwen, inputs, answer, elastic.make_cache("full"))
    assert qwen.model.rope_deltas.abs().sum() > 0  # the image really shifts text positions
    assert nll == pytest.approx(plain_nll(qwen, inputs, answer), rel=1e-4)


def test_every_method_at_budget_one_equals_full(llava):
    model, processor = llava
    sample = _samples()[3]  # two-turn chat: the longest prompt
    inputs, answer = evaluate.prepare(model, processor, sample)
    reference = plain_nll(model, inputs, answer)
    for method in elastic.METHODS:
        nll, _ = evaluate.teacher_forced_nll(model, inputs, answer, elastic.make_cache(method, budget=1.0))
        assert nll == pytest.approx(reference, rel=1e-4), method
    # ...and the comparison is not vacuous: a small budget changes the result.
    cache = elastic.make_cache("local", budget=0.3)
    nll, _ = evaluate.teacher_forced_nll(model, inputs, answer, cache)
    assert cache.lengths[0] < inputs["input_ids"].shape[1]
    assert abs(nll - reference) > 1e-4


def test_answer_tokens_follow_the_prompt(llava):
    model, processor = llava
    sample = _samples()[0]
    inputs, answer = evaluate.prepare(model, processor, sample)
    tok = processor.tokenizer
    # The word tokenizer maps each word to one id; the answer ends with the chat's </s>.
    assert tok.convert_ids_to_tokens(answer.tolist()) == ["a", "red", "circle", ".", "</s>"]
    assert inputs["input_ids"][0, -1] == tok.convert_tokens_to_ids(":")  # "... ASSISTANT :"


# ---------------------------------------------------------------- ROUGE-L and the grid

def _lcs_f1(a: str, b: str) -> float:
    x, y = a.lower().split(), b.lower().split()
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, u in enumerate(x):
        for j, v in enumerate(y):
            table[i + 1][j + 1] = table[i][j] + 1 if u == v else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("pred, ref", [("the red circle is here", "a red circle is there"),
                                        ("blue square", "the blue square and a red circle"),
                                        ("same words", "same words"), ("nothing alike", "completely different")])
def test_rouge_l_matches_hand_lcs(pred, ref):
    assert rouge_l(pred, ref) == pytest.approx(_lcs_f1(pred, ref))


def test_run_grid_outputs_and_resume(llava, tmp_path, monkeypatch):
    model, processor = llava
    samples = _samples()[:2]
    records = evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.5, 1.0),
                           out=tmp_path, max_new_tokens=6, progress=False)
    assert [(r["method"], r["budget"]) for r in records] == [
        ("full", 1.0), ("elastic", 0.5), ("elastic", 1.0)]
    by = {(r["method"], r["budget"]): r for r in records}
    assert by[("full", 1.0)]["rouge_l"] == 1.0
    for r in records:
        assert r["samples"] == 2 and set(evaluate.FIELDS) <= set(r)
    # Budget 1.0 keeps everything: same PPL, same text.
    assert by[("elastic", 1.0)]["ppl"] == pytest.approx(by[("full", 1.0)]["ppl"], rel=1e-4)
    assert by[("elastic", 1.0)]["rouge_l"] == 1.0 and by[("elastic", 1.0)]["kv_kept"] == 1.0
    assert by[("elastic", 0.5)]["kv_kept"] == pytest.approx(0.5, abs=0.05)

    # The full cache's generations (the references) equal plain greedy decoding without it.
    full = json.loads((tmp_path / "parts" / "full-1.000.json").read_text())
    for sample, row in zip(samples, full["samples"]):
        inputs, _ = evaluate.prepare(model, processor, sample)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=1)
        expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["text"] == expected.strip()

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(records))
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("method,budget,ppl,rouge_l,samples")
    assert "plotly" in (tmp_path / "figure.html").read_text()

    # Resume: nothing is recomputed when every part is saved under the same settings...
    def boom(*args, **kwargs):
        raise AssertionError("recomputed a saved pair")

    monkeypatch.setattr(evaluate, "evaluate_sample", boom)
    again = evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.5, 1.0),
                         out=tmp_path, max_new_tokens=6, progress=False)
    assert again == records
    # ...but a changed setting invalidates them.
    with pytest.raises(AssertionError, match="recomputed"):
        evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.5,), out=tmp_path,
                     max_new_tokens=7, progress=False)
    # ...and so do other weights under the same model name (a retrained model).
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    try:
        with pytest.raises(AssertionError, match="recomputed"):
            evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.5, 1.0), out=tmp_path,
                         max_new_tokens=6, progress=False)
    finally:
        with torch.no_grad():
            next(model.parameters()).sub_(1e-3)


def test_figure_layout():
    records = [{"method": "full", "budget": 1.0, "ppl": 2.0, "rouge_l": 1.0}] + [
        {"method": m, "budget": b, "ppl": 3 - b, "rouge_l": b} for m in ("elastic", "h2o") for b in (0.2, 0.5)]
    fig = evaluate.figure(records)
    names = [(t.name, t.xaxis) for t in fig.data]
    assert names.count(("elastic", "x")) == 1 and names.count(("elastic", "x2")) == 1
    full = [t for t in fig.data if t.name == "full"]
    assert [list(t.x) for t in full] == [[0.2, 0.5]] * 2 and full[0].line.dash == "dash"
    assert list(fig.data[2].y) == [2.8, 2.5]  # elastic PPL, by budget


# ---------------------------------------------------------------- data sets

def test_loaders_read_both_formats():
    mmvet = datasets.load_mmvet(FIXTURES / "mmvet.json", IMAGES)
    assert [s.answer for s in mmvet] == ["a red circle .", "blue ."]
    assert mmvet[1].messages == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what colour is the circle ?"}]}]  # <image> mark removed
    assert mmvet[0].load_image().size == (16, 16)

    real = datasets.load(str(FIXTURES / "mmvet_dict.json"), IMAGES)  # mm-vet.json's own shape
    assert real[0].id == "v1_0" and real[0].image == IMAGES / "red.png"

    chats = datasets.load(str(FIXTURES / "llava.json"), IMAGES)
    assert [s.id for s in chats] == ["one-turn", "two-turns"]
    two = chats[1]
    assert [m["role"] for m in two.messages] == ["user", "assistant", "user"]
    assert two.messages[0]["content"][0] == {"type": "image"} and two.messages[2]["content"][0]["type"] == "text"
    assert two.messages[0]["content"][1]["text"] == "what is in the image ?"
    assert two.answer == "blue ." and two.with_answer()[-1]["content"][0]["text"] == "blue ."


def test_synthetic_samples_are_the_validation_scenes():
    from elastic.tiny import data

    samples = datasets.load("synthetic", samples=2)
    scene = data.make_scene(data.VAL_OFFSET + 1)
    assert samples[1].answer == data.describe(scene)
    assert samples[1].messages[0]["content"][1]["text"] == data.DESCRIBE_PROMPT
    assert isinstance(samples[1].load_image(), Image.Image)
    qa = datasets.load("synthetic-qa", samples=3)
    assert all(len(s.answer) < len(data.describe(data.make_scene(s.meta["seed"]))) for s in qa)


@pytest.mark.parametrize("content, message", [
    ('[{"image": "red.png", "question": "q"}]', r"record 0 .*missing key 'answer'"),
    ('[{"image": "red.png", "question": "q", "answer": ""}]', r"'answer' must be a non-empty string"),
    ('[{"image": "nope.png", "question": "q", "answer": "a"}]', r"image .*nope.png.* not found"),
    ('[{"question": "q", "answer": "a"}]', r"missing key 'image'"),
    ('[{"image": "red.png", "question": "q", "answer": "a"}, 3]', r"record 1: expected an object, got int"),
    ('[{"image": "red.png", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}]',
     r"turn 0 must be from 'human', got 'gpt'"),
    ('[{"image": "red.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},'
     ' {"from": "human", "value": "q2"}]}]', r"last turn must be from 'gpt'"),
    ('[{"image": "red.png", "conversations": "hello"}]', r"'conversations' must be a list"),
    ('[{"image": "red.png", "text": "hello"}]', r"cannot tell the format"),
    ('{"a": 1', r"not valid JSON"),
    ('[]', r"holds no records"),
    ('"text"', r"expected a list of records"),
])
def test_loaders_reject_malformed_records(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.load(str(path), IMAGES)


def test_cli_arguments():
    args = evaluate.parse_args(["--budgets", "0.2", "0.5,0.8", "--methods", "elastic,h2o", "--samples", "3"])
    assert evaluate._floats(args.budgets) == [0.2, 0.5, 0.8]
    assert evaluate.parse_args([]).budgets is None  # resolved to DEFAULT_BUDGETS (one budget, 0.5, for --ablation)
    assert math.isclose(evaluate.parse_args([]).distance, -25)


# ---------------------------------------------------------------- ablation

def test_paired_bootstrap_against_hand_cases():
    from elastic.ablation import paired_bootstrap

    base = [{"id": str(i), "nll": 2.0 + i, "tokens": 4 + i, "rouge_l": 0.1 * i} for i in range(6)]
    same = paired_bootstrap(base, base)
    assert same == {"ppl_diff_ci": [0.0, 0.0], "rouge_l_diff_ci": [0.0, 0.0]}
    shifted = [{**r, "rouge_l": r["rouge_l"] + 0.25} for r in base]  # every sample 0.25 better
    assert paired_bootstrap(base, shifted)["rouge_l_diff_ci"] == pytest.approx([0.25, 0.25])
    doubled = [{**r, "nll": r["nll"] + r["tokens"] * math.log(2)} for r in base]  # PPL x2 on any resample
    lo, hi = paired_bootstrap(base, doubled)["ppl_diff_ci"]
    ppls = [math.exp(r["nll"] / r["tokens"]) for r in base]
    assert min(ppls) - 1e-9 <= lo <= hi <= max(ppls) + 1e-9 and lo > 0
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(base, base[::-1])


def test_ablation_table_runs_every_variant(llava, tmp_path):
    from elastic import ablation

    model, processor = llava
    samples = _samples()[:2]
    parts = evaluate.run_variants(model, processor, samples, ablation.variants("paper"), tmp_path,
                                  max_new_tokens=4, progress=False)
    rows = ablation.table(parts, "paper")
    assert [r["variant"] for r in rows] == ["full"] + [v[0] for v in ablation.PAPER]
    plain = evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.5,), max_new_tokens=4,
                         progress=False)[1]
    by = {r["variant"]: r for r in rows}
    assert by["elastic"]["ppl"] == pytest.approx(plain["ppl"])  # the default variant is plain Elastic
    for r in rows[2:]:
        assert r["options"] and r["kv_kept"] == pytest.approx(by["elastic"]["kv_kept"])  # same budget rule
        assert r["ppl_diff"] == pytest.approx(r["ppl"] - by["elastic"]["ppl"])
        assert r["ppl_diff_ci"][0] <= r["ppl_diff_ci"][1]
    saved = json.loads((tmp_path / "parts" / "scope-head-0.500.json").read_text())
    assert saved["record"]["options"] == {"scope": "head"}
    text = ablation.markdown(rows)
    assert all(f"| {v[0]} |" in text for v in ablation.PAPER) and "3.60" in text


def test_compressed_positions_protocol_in_the_evaluation(llava):
    """With nothing evicted the cache's length is the true position, so the protocols agree;
    compressed, they differ (the reference code's protocol shifts every decoded token)."""
    model, processor = llava
    samples = _samples()[:2]
    true = evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.4, 1.0), max_new_tokens=4,
                        progress=False)
    comp = evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.4, 1.0), max_new_tokens=4,
                        positions="compressed", progress=False)
    assert comp[2]["ppl"] == pytest.approx(true[2]["ppl"], rel=1e-5)  # elastic at budget 1.0
    assert abs(comp[1]["ppl"] - true[1]["ppl"]) > 1e-4 * true[1]["ppl"]  # elastic at 0.4


def test_ablation_command_line(tmp_path, capsys):
    rows = evaluate.main(["--model", "tiny-llava", "--ablation", "protocol", "--samples", "2",
                          "--max-new-tokens", "3", "--out", str(tmp_path)])
    from elastic.ablation import PROTOCOL

    assert [r["variant"] for r in rows] == ["full"] + [v[0] for v in PROTOCOL]
    by = {r["variant"]: r for r in rows}
    assert by["h2o-ref-compressed-positions"]["options"] == {"positions": "compressed"}
    assert (tmp_path / "ablation-protocol.md").read_text().startswith("| variant | PPL |")
    assert json.loads((tmp_path / "ablation-protocol.json").read_text()) == json.loads(json.dumps(rows))
    assert "ablation-protocol.md" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="one budget"):
        evaluate.main(["--model", "tiny-llava", "--ablation", "paper", "--budgets", "0.3", "0.5"])


@pytest.mark.parametrize("argv, expected", [
    (["--budgets", "0.5", "1.5"], "--budgets: budget must be in (0, 1]"),
    (["--budgets", "abc"], "--budgets: could not convert"),
    (["--samples", "0"], "samples must be a whole number >= 1"),
    (["--methods", "elastic,magic"], "unknown method(s) ['magic']"),
    (["--data", "/"], "is a folder, not a JSON file"),
])
def test_command_line_mistakes_are_one_line_before_the_model_loads(argv, expected, monkeypatch):
    import elastic.models

    monkeypatch.setattr(elastic.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as raised:
        evaluate.main(argv)
    assert str(raised.value).startswith("error: ") and expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_data_files_cannot_name_images_outside_the_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes((IMAGES / "red.png").read_bytes())
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": "../secret.png", "question": "q ?", "answer": "a ."}]))
    with pytest.raises(datasets.DatasetError, match="outside the image folder"):
        datasets.load(str(data), tmp_path / "images")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00not text")
    with pytest.raises(datasets.DatasetError, match="not a UTF-8 text file"):
        datasets.load(str(binary))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(datasets.DatasetError, match="nested too deeply"):
        datasets.load(str(deep))


def test_calibrated_prefixkv_joins_the_grid_and_resumes(llava, tmp_path, monkeypatch):
    from elastic import calibrate

    model, processor = llava
    samples = _samples()[:2]
    records = evaluate.run(model, processor, samples, methods=("prefixkv",), budgets=(0.5,), out=tmp_path,
                           max_new_tokens=4, progress=False, calibrate=2)
    assert [(r["method"], r["budget"]) for r in records] == [
        ("full", 1.0), ("prefixkv", 0.5), ("prefixkv-calibrated", 0.5)]
    expected = calibrate.prefixkv_ratios(model, processor, calibrate.calibration_samples(2), 0.5, progress=False,
                                         start_size=1, distance=-25)
    part = json.loads((tmp_path / "parts" / "prefixkv-calibrated-0.500.json").read_text())
    assert part["record"]["options"] == {"ratios": list(expected)}
    # The calibrated variant's PPL is PrefixKV's with those ratios, sample by sample.
    for sample, row in zip(samples, part["samples"]):
        inputs, answer, annotations = evaluate._prepare(model, processor, sample)
        cache = elastic.make_cache("prefixkv", budget=0.5, start_size=1, distance=-25, ratios=expected)
        cache.annotate(spans=annotations["spans"])
        assert evaluate.teacher_forced_nll(model, inputs, answer, cache)[0] == pytest.approx(row["nll"], rel=1e-6)
    assert "prefixkv-calibrated PPL" in evaluate.markdown_table(records)

    monkeypatch.setattr(evaluate, "evaluate_sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = evaluate.run(model, processor, samples, methods=("prefixkv",), budgets=(0.5,), out=tmp_path,
                         max_new_tokens=4, progress=False, calibrate=2)
    assert again == records  # the ratios saved as JSON compare equal: resumed
    with pytest.raises(ValueError, match="add prefixkv to --methods"):
        evaluate.run(model, processor, samples, methods=("elastic",), budgets=(0.5,), calibrate=2)
