"""tinyllama.eval: scores equal lm-evaluation-harness's `hf` backend and transformers' perplexity."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from tinyllama.config import ModelConfig
from tinyllama.errors import TinyLlamaError
from tinyllama.eval.scoring import Scorer, rolling_windows
from tinyllama.eval.tasks import load_task, mean_stderr, score_items
from tinyllama.model import Llama
from tinyllama.tokenizer import Tokenizer




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tinyllama-tiny"))
    with torch.no_grad():  # a sharper output distribution than random init: choices differ clearly
        model.lm_head.weight.mul_(30)
    d = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ours(model_dir):
    model = Llama.from_pretrained(model_dir, dtype="float32").eval()
    return Scorer(model, Tokenizer(model_dir), batch_size=3)


# ---- items in each task's public format -----------------------------------------------------------
WORDS = "the cat dog ran over under a tree house river quickly slowly red blue green big small".split()


def _phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def write_task_files(d: Path) -> dict[str, dict]:
    """Writes each task twice when the harness reads a different layout: ours (original) and the harness's (HF)."""
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}

    def jl(name, rows):
        p = d / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p

    hs = [{"ind": i, "activity_label": "Making tea", "ctx_a": _phrase(i, 6) + ".", "ctx_b": _phrase(i + 1, 3),
           "ctx": "", "split": "val", "split_type": "indomain", "label": i % 4,
           "endings": [_phrase(i + j, 4 + j) + (" [title] step" if j == 1 else ".") for j in range(4)],
           "source_id": f"s{i}"} for i in range(5)]
    p = jl("hellaswag_val.jsonl", hs)
    files["hellaswag"] = {"ours": p, "lm": p}

    arc_orig, arc_hf = [], []
    for i in range(5):
        labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3", "4"]
        texts = [_phrase(i + j, 2 + j) for j in range(4)]
        q = _phrase(i, 5) + "?"
        arc_orig.append({"id": f"q{i}", "question": {"stem": q, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
                         "answerKey": labels[(i + 1) % 4]})
        arc_hf.append({"id": f"q{i}", "question": q, "choices": {"text": texts, "label": labels}, "answerKey": labels[(i + 1) % 4]})
    files["arc_easy"] = {"ours": jl("ARC-Easy-Test.jsonl", arc_orig), "lm": jl("arc_hf.jsonl", arc_hf)}
    files["arc_challenge"] = files["arc_easy"]

    obqa_orig = [{"id": r["id"], "question": r["question"], "fact1": "x", "answerKey": r["answerKey"]} for r in arc_orig]
    obqa_hf = [{"id": r["id"], "question_stem": r["question"], "choices": r["choices"], "answerKey": r["answerKey"]} for r in arc_hf]
    files["openbookqa"] = {"ours": jl("obqa_test.jsonl", obqa_orig), "lm": jl("obqa_hf.jsonl", obqa_hf)}

    wg = [{"qID": f"w{i}", "sentence": _phrase(i, 4) + " _ " + _phrase(i + 2, 3) + ".", "option1": _phrase(i, 1),
           "option2": _phrase(i + 3, 2), "answer": str(1 + i % 2)} for i in range(5)]
    p = jl("winogrande_dev.jsonl", wg)
    files["winogrande"] = {"ours": p, "lm": p}

    piqa = [{"goal": _phrase(i, 5), "sol1": _phrase(i + 1, 6), "sol2": _phrase(i + 2, 3)} for i in range(5)]
    p = jl("valid.jsonl", piqa)
    (d / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(5)))
    files["piqa"] = {"ours": p, "lm": jl("piqa_hf.jsonl", [{**r, "label": i % 2} for i, r in enumerate(piqa)])}

    bq = [{"question": _phrase(i, 5), "title": "t", "answer": bool(i % 2), "passage": _phrase(i + 4, 12) + "."}
          for i in range(5)]
    files["boolq"] = {"ours": jl("boolq_dev.jsonl", bq),
                      "lm": jl("boolq_sg.jsonl", [{"question": r["question"], "passage": r["passage"], "idx": i,
                                                    "label": int(r["answer"])} for i, r in enumerate(bq)])}

    mm_dir = d / "mmlu" / "data"
    (mm_dir / "test").mkdir(parents=True)
    (mm_dir / "dev").mkdir(parents=True)
    rows = {"test": [[_phrase(i, 6) + "?", *[_phrase(i + j, 2) for j in range(4)], "ABCD"[(i * 3) % 4]] for i in range(5)],
            "dev": [[_phrase(i + 9, 5) + "?", *[_phrase(i + j + 9, 2) for j in range(4)], "ABCD"[i % 4]] for i in range(5)]}
    hf = {}
    for split, rs in rows.items():
        with open(mm_dir / split / f"anatomy_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rs)
        hf[split] = jl(f"mmlu_{split}.jsonl", [{"question": r[0], "subject": "anatomy", "choices": r[1:5],
                                                "answer": "ABCD".index(r[5])} for r in rs])
    files["mmlu"] = {"ours": mm_dir, "lm": hf["test"], "lm_dev": hf["dev"]}
    return files


LM_TASK_YAML = {  # harness task config to include, and its metric list (extended with acc_norm where absent)
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "mmlu": "mmlu/default/mmlu_anatomy.yaml",
}


@pytest.fixture(scope="module")
def lm_setup(model_dir, tmp_path_factory):
    """Task files, harness task YAMLs pointing at them, and the harness's `hf` backend results on all of them."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import yaml
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lm")
    files = write_task_files(tmp / "data")
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    inc = tmp / "lm_tasks"
    inc.mkdir()
    cfgs = {}
    for name, rel in LM_TASK_YAML.items():
        data_files = {"validation": str(files[name]["lm"])}
        cfg = {"include": str(tasks_root / rel), "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": data_files}, "training_split": None, "validation_split": "validation",
               "test_split": None, "tag": [], "metric_list": [
                   {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                   {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
        if name == "mmlu":
            data_files["dev"] = str(files[name]["lm_dev"])
            cfg.update(fewshot_split="dev", num_fewshot=MMLU_SHOTS)
        cfgs[f"tl_{name}"] = cfg
        if name == "mmlu":  # and zero-shot
            cfgs["tl_mmlu0"] = {**cfg, "num_fewshot": 0}
    roll = tmp / "roll.jsonl"
    roll.write_text("".join(json.dumps({"text": " ".join(_phrase(i + j, 8) + "." for j in range(40))}) + "\n"
                            for i in range(2)))
    gen = tmp / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": _phrase(i, 6), "answer": _phrase(i, 2)}) + "\n" for i in range(3)))
    cfgs["tl_roll"] = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(roll)}}, "test_split": "test",
                       "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                                        "higher_is_better": False},
                                       {"metric": "bits_per_byte", "aggregation": "bits_per_byte",
                                        "higher_is_better": False}]}
    cfgs["tl_gen"] = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(gen)}}, "test_split": "test",
                      "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                      "generation_kwargs": {"until": ["\n\n", "."], "max_gen_toks": 8, "do_sample": False},
                      "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    for name, cfg in cfgs.items():
        (inc / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **cfg}))
    hf = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}, tasks=list(cfgs),
        task_manager=TaskManager(include_path=str(inc), include_defaults=False), batch_size=4, log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0,
    )
    return files, inc, hf


MMLU_SHOTS = 2


@pytest.mark.slow
def test_multiple_choice_equals_lm_eval_hf_backend(lm_setup, ours):
    files, _, res = lm_setup
    for key in [*LM_TASK_YAML, "mmlu0"]:
        name = "mmlu" if key == "mmlu0" else key
        kwargs = {"num_fewshot": MMLU_SHOTS if key == "mmlu" else 0} if name == "mmlu" else {}
        items = load_task(name, files[name]["ours"], **kwargs)
        pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
        lls = [ll for ll, _ in ours.loglikelihood(pairs)]
        mine = score_items(items, lls)
        theirs = res["results"][f"tl_{key}"]
        samples = sorted(res["samples"][f"tl_{key}"], key=lambda s: s["doc_id"])
        # The same requests, in the same order, with the same scores.
        assert [tuple(a)[:2] for smp in samples for a in smp["arguments"]] == [tuple(p) for p in pairs], name
        their_lls = [float(r[0][0]) for smp in samples for r in smp["resps"]]
        assert lls == pytest.approx(their_lls, abs=2e-4), name
        assert mine["per_item"]["acc"] == [s["acc"] for s in samples], name
        assert mine["per_item"]["acc_norm"] == [s["acc_norm"] for s in samples], name
        assert mine["acc"] == theirs["acc,none"] and mine["acc_norm"] == theirs["acc_norm,none"], name
        assert mine["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], rel=1e-9), name
        assert mine["acc_norm_stderr"] == pytest.approx(theirs["acc_norm_stderr,none"], rel=1e-9), name


def test_perplexity_equals_transformers(model_dir, ours):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from tinyllama.eval.perplexity import perplexity_of_texts

    text = " ".join(_phrase(i, 9) + "." for i in range(60))  # several windows of 64 tokens, last one partial
    window = 64
    r = perplexity_of_texts(ours, [text], window=window)
    toks = ours.tokenizer.encode(text)
    assert r["tokens"] == len(toks) and r["windows"] == math.ceil(len(toks) / window)
    # transformers on the same windows: each chunk of `window` tokens predicted from up to `window` preceding ones
    nll, counted = 0.0, 0
    full = [ours.tokenizer.bos_id] + toks
    for start in range(0, len(toks), window):
        end = min(start + window, len(toks))
        inp_lo = max(0, end - window)  # in `full` coordinates, token k of toks is at k+1
        ids = torch.tensor([full[inp_lo:end]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        tgt = torch.tensor(full[inp_lo + 1:end + 1])
        per = logp.gather(-1, tgt[:, None])[:, 0]
        n_new = end - start
        nll -= float(per[-n_new:].sum())
        counted += n_new
    assert counted == len(toks)
    assert r["ppl"] == pytest.approx(math.exp(nll / counted), rel=1e-5)


def test_rolling_windows_score_each_token_once():
    toks = list(range(10, 33))
    ws = rolling_windows(toks, 1, 8)
    assert [t for _, c in ws for t in c] == toks
    assert ws[0][0] == [1]
    for ctx, cont in ws[1:]:
        assert len(ctx) + len(cont) == 9 and ctx[-1] == toks[toks.index(cont[0]) - 1]


def test_batching_does_not_change_scores(ours):
    pairs = [(_phrase(i, 3 + i), " " + _phrase(i + 1, 1 + i % 3)) for i in range(7)]
    batched = ours.loglikelihood(pairs)
    single = Scorer(ours.model, ours.tokenizer, batch_size=1).loglikelihood(pairs)
    assert [b[1] for b in batched] == [s[1] for s in single]
    assert [b[0] for b in batched] == pytest.approx([s[0] for s in single], abs=1e-4)


def test_stderr_and_norm():
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(math.sqrt(0.75 / 3) / 2, rel=1e-12)
    assert mean_stderr([1.0, 0.0]) == pytest.approx(0.5)
    from tinyllama.eval.tasks import MCItem

    it = MCItem(["q"] * 2, [" a", " bbbb"], ["a", "bbbb"], gold=1)
    r = score_items([it], [-2.0, -4.0])  # acc picks "a"; per character "bbbb" (-1.0) beats "a" (-2.0)
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0


@pytest.mark.parametrize("task,line,msg", [
    ("winogrande", {"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}, "no '_' blank"),
    ("arc_easy", {"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "Z"}, "answerKey 'Z'"),
    ("hellaswag", {"ctx_a": "x", "ctx_b": "y", "endings": ["a"], "label": 0}, "missing field 'activity_label'"),
    ("boolq", {"question": "q", "passage": "p", "answer": "maybe"}, "true or false"),
])
def test_bad_task_files_name_the_line(tmp_path, task, line, msg):
    p = tmp_path / "f.jsonl"
    p.write_text("\n" + json.dumps(line) + "\n")
    with pytest.raises(TinyLlamaError, match=rf"f\.jsonl:2: .*{msg}"):
        load_task(task, p)


def test_cli_writes_table_and_json(model_dir, tmp_path, capsys):
    from tinyllama.cli import main

    files = write_task_files(tmp_path / "data")
    txt = tmp_path / "doc.txt"
    txt.write_text(" ".join(_phrase(i, 5) for i in range(30)))
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", str(model_dir), "--tasks", f"arc_easy={files['arc_easy']['ours']}",
               f"mmlu:1={files['mmlu']['ours']}", "--perplexity", str(txt), "--output", str(out), "--batch-size", "4"])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "arc_easy" in shown and "mmlu_1shot" in shown and "perplexity" in shown
    res = json.loads(out.read_text())
    assert res["tasks"]["arc_easy"]["n"] == 5 and res["perplexity"][str(txt)]["ppl"] > 1
    assert main(["eval", "--model", str(model_dir), "--tasks", "nosuch=x"]) == 2


def test_cli_json_output_gets_the_umask_mode(model_dir, tmp_path):
    import stat

    from tinyllama.cli import main

    txt = tmp_path / "doc.txt"
    txt.write_text(" ".join(_phrase(i, 5) for i in range(10)))
    old = os.umask(0o022)
    try:
        assert main(["eval", "--model", str(model_dir), "--perplexity", str(txt), "--output", str(tmp_path / "r.json")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644  # not mkstemp's 0600


@pytest.mark.slow
def test_lm_eval_adapter_equals_hf_backend_for_all_request_types(model_dir, lm_setup, tmp_path):
    """`lm_eval --model tinyllama` (through the wrapper CLI) gives the hf backend's numbers and generations."""
    import subprocess
    import sys

    _, inc, hf = lm_setup
    names = ["tl_arc_easy", "tl_roll", "tl_gen"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tinyllama.eval.lm_eval_cli", "--model", "tinyllama", "--model_args",
           f"pretrained={model_dir},dtype=float32,device=cpu", "--tasks", ",".join(names), "--include_path", str(inc),
           "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    theirs = hf["results"]
    assert ours["tl_arc_easy"]["acc,none"] == theirs["tl_arc_easy"]["acc,none"]
    assert ours["tl_arc_easy"]["acc_norm,none"] == theirs["tl_arc_easy"]["acc_norm,none"]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["tl_roll"][metric] == pytest.approx(theirs["tl_roll"][metric], rel=1e-4)
    gen_samples = [json.loads(line) for line in next(out.rglob("samples_tl_gen_*.jsonl")).read_text().splitlines()]
    mine = {s["doc_id"]: s["filtered_resps"][0] for s in gen_samples}
    ref = {s["doc_id"]: s["filtered_resps"][0] for s in hf["samples"]["tl_gen"]}
    assert mine == ref and any(v.strip() for v in ref.values())


def test_lm_eval_entry_point_names_the_adapter_class():
    """pyproject declares `tinyllama` in the `lm_eval.models` entry-point group (metadata of `pip install -e .`)."""
    from importlib.metadata import entry_points

    pytest.importorskip("lm_eval")
    from tinyllama.eval.lm_eval_adapter import TinyLlamaLM

    eps = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "tinyllama"]
    assert len(eps) == 1, "no lm_eval.models entry point: re-run `pip install -e .` after editing pyproject.toml"
    # lm-eval swaps the entry point for the class its @register_model registers only when both name the same
    # "module:Class"; anything else (a module, an alias) is a registry collision there.
    assert eps[0].value == f"{TinyLlamaLM.__module__}:{TinyLlamaLM.__name__}"
    assert eps[0].load() is TinyLlamaLM


def _plugin_loading_lm_eval():
    """Skip unless the installed lm-eval resolves `--model NAME` through `lm_eval.models` entry points
    (EleutherAI/lm-evaluation-harness PR #4013's `load_plugins`; releases up to 0.4.13 do not)."""
    registry = pytest.importorskip("lm_eval.api.registry")
    if not hasattr(registry, "load_plugins"):
        from importlib.metadata import version

        pytest.skip(f"lm-eval {version('lm_eval')} does not load model plugins from entry points; "
                    "`tinyllama-lm-eval` is the way there")


def test_lm_eval_registry_finds_tinyllama_without_importing_it():
    _plugin_loading_lm_eval()
    import subprocess
    import sys

    code = ("from lm_eval.api.registry import get_model; cls = get_model('tinyllama'); "
            "print(cls.__module__ + ':' + cls.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "tinyllama.eval.lm_eval_adapter:TinyLlamaLM"


@pytest.mark.slow
def test_plain_lm_eval_cli_runs_the_tinyllama_model(model_dir, ours, tmp_path):
    """`python -m lm_eval --model tinyllama` (no wrapper) scores a local task with tinyllama's scorer."""
    _plugin_loading_lm_eval()
    import subprocess
    import sys

    import yaml

    rows = [{"q": _phrase(i, 6) + "?", "choices": [_phrase(i + j, 2 + j) for j in range(3)], "label": i % 3}
            for i in range(4)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    inc = tmp_path / "tasks"
    inc.mkdir()
    (inc / "tl_plugin.yaml").write_text(yaml.safe_dump({
        "task": "tl_plugin", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "tinyllama", "--model_args",
           f"pretrained={model_dir},dtype=float32,device=cpu", "--tasks", "tl_plugin", "--include_path", str(inc),
           "--limit", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for line in next(out.rglob("samples_tl_plugin_*.jsonl")).read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1]
    for s in samples:
        q, choices = rows[s["doc_id"]]["q"], rows[s["doc_id"]]["choices"]
        mine = [ll for ll, _ in ours.loglikelihood([(q, " " + c) for c in choices])]
        assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(mine, abs=1e-4)


def test_perplexity_of_a_prepared_dataset_scores_its_documents(model_dir, ours, tmp_path):
    from tinyllama.data.prepare import prepare
    from tinyllama.eval.run import EvalConfig, evaluate
    from tinyllama.eval.perplexity import perplexity_of_tokens

    texts = [f"Document {i}: " + _phrase(i, 20) + "." for i in range(4)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([src], tmp_path / "ds", val_fraction=0.0)
    res = evaluate(EvalConfig(perplexity=[str(tmp_path / "ds")], split="train", window=32), ours.model, ours.tokenizer)
    r = res["perplexity"][str(tmp_path / "ds")]
    # Each prepared document is its text's tokens followed by </s>; every one is scored, conditioned on BOS.
    expect = perplexity_of_tokens(ours, [ours.tokenizer.encode(t, eos=True) for t in texts], window=32)
    assert r["documents"] == 4 and r["tokens"] == expect["tokens"]
    assert r["ppl"] == pytest.approx(expect["ppl"], rel=1e-6)


def test_perplexity_documents_read_through_the_data_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from tinyllama.errors import TinyLlamaError
    from tinyllama.eval.perplexity import iter_documents

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    assert list(iter_documents(tmp_path / "a.jsonl")) == ["one", "two", "three"]
    assert list(iter_documents(tmp_path / "a.jsonl", limit=2)) == ["one", "two"]
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"body": "z"}\n'))
    assert list(iter_documents(tmp_path / "b.jsonl.zst", text_field="body")) == ["z"]
    pq.write_table(pa.table({"content": ["def f(): pass"]}), tmp_path / "c.parquet")
    assert list(iter_documents(tmp_path / "c.parquet")) == ["def f(): pass"]
    (tmp_path / "d.raw").write_text("the whole\nfile")
    assert list(iter_documents(tmp_path / "d.raw")) == ["the whole\nfile"]
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(TinyLlamaError, match=r"e\.jsonl:2: field 'text' is int"):
        list(iter_documents(tmp_path / "e.jsonl"))


def test_a_wrong_perplexity_path_names_the_prepared_datasets_it_was_meant_for(tmp_path):
    """The README's demo data is out/data/demo-<fingerprint>/{prose,code}: `out/data/demo` (missing) and the
    fingerprinted folder (no manifest of its own) each fail in one line that names the datasets; a path with
    nothing near it says only what is missing."""
    from tinyllama.data.prepare import prepare
    from tinyllama.eval.run import EvalConfig, _documents_for_perplexity

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "one two three"}) + "\n")
    data = tmp_path / "data"
    for name in ("prose", "code"):
        prepare([src], data / "demo-0123456789" / name, val_fraction=0.0)
    cfg = EvalConfig()
    sets = f"{data}/demo-0123456789/code {data}/demo-0123456789/prose"
    named = rf"\(prepared datasets: {re.escape(sets)}\)$"
    with pytest.raises(TinyLlamaError, match=rf"data/demo: no such text file or prepared dataset directory {named}"):
        _documents_for_perplexity(None, str(data / "demo"), cfg)
    with pytest.raises(TinyLlamaError, match=rf"demo-0123456789: neither a prepared dataset .*{named}"):
        _documents_for_perplexity(None, str(data / "demo-0123456789"), cfg)
    with pytest.raises(TinyLlamaError, match=r"wiki\.test\.txt: no such text file or prepared dataset directory$"):
        _documents_for_perplexity(None, str(data / "wiki.test.txt"), cfg)
