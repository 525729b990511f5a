"""`tinyllama bench serve`: what it needs, and how it says so."""

import sys

from tinyllama.cli import main


def test_bench_serve_without_openai_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openai", None)  # what `import openai` meets when it is not installed
    assert main(["bench", "serve", "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tinyllama bench serve needs the openai client") and len(err.splitlines()) == 1
    assert "pip install 'tinyllama-forge[bench]'" in err


def test_bench_serve_against_transformers_continuous_batching_cpu_smoke(tmp_path):
    """The HTTP load and the in-process comparison with transformers' generate_batch, tiny preset on the CPU:
    both sides generate every token, greedy outputs agree (fp32, same weights), the ratio is reported."""
    import json

    import pytest

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    if not hasattr(transformers.GenerationMixin, "generate_batch"):
        pytest.skip("this transformers has no continuous batching (generate_batch)")
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--preset", "tinyllama-tiny", "--requests", "6", "--clients", "3",
                 "--max-tokens", "5", "--batch-sizes", "4", "--threads", "1", "--device", "cpu",
                 "--transformers", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["failures"] == 0
    c = report["vs_transformers_continuous_batching"]
    assert c["ours"]["completion_tokens"] == c["transformers"]["completion_tokens"] == 6 * 5
    assert c["requests_with_identical_tokens"] == "6/6"
    assert c["ratio_tokens_per_s"] == round(c["ours"]["tokens_per_s"] / c["transformers"]["tokens_per_s"], 2) > 0
