"""Speculative decoding: greedy output is the target's; sampled output follows the target's distribution."""

import pytest
import torch

from tinyllama import Llama, ModelConfig
from tinyllama.generate import GenerationError, SamplingConfig, generate
from tinyllama.speculative import speculative_generate, verify




TARGET = ModelConfig(name="spec-target", vocab_size=256, n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2,
                     intermediate_size=160, max_seq_len=128)
DRAFT = ModelConfig(name="spec-draft", vocab_size=256, n_layers=1, hidden_size=32, n_heads=2, n_kv_heads=1,
                    intermediate_size=64, max_seq_len=128)


def _model(cfg, seed, sharpen):
    torch.manual_seed(seed)
    m = Llama(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return m


def _chi2_pvalue(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    n = observed.sum()
    exp = expected_p.double() * n
    small = exp < 5
    obs = observed.double()
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum().view(1)])
        exp = torch.cat([exp[~small], exp[small].sum().view(1)])
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2).item()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_is_the_targets(k):
    target = _model(TARGET, 1, 6.0)
    # a draft that is a slightly perturbed copy of the target agrees often but not always
    draft = _model(TARGET, 1, 6.0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for prompt in ([1, 5, 9], [1, 17, 200, 3, 3, 3, 8]):
        ref = generate(target, prompt, max_new_tokens=30, stop_at_eos=False)
        out, stats = speculative_generate(target, draft, prompt, max_new_tokens=30, stop_at_eos=False, k=k)
        assert out == ref
        assert stats.new_tokens == 30 and 0 < stats.acceptance_rate < 1
        assert stats.rounds < 30 or k == 1
    # an unrelated, different-size draft still gives the target's output (only slower)
    other = _model(DRAFT, 9, 6.0)
    ref = generate(target, [1, 5, 9], max_new_tokens=30, stop_at_eos=False)
    assert speculative_generate(target, other, [1, 5, 9], max_new_tokens=30, stop_at_eos=False, k=k)[0] == ref


def test_stops_at_eos_and_respects_budget():
    target = _model(TARGET, 1, 6.0)
    draft = _model(DRAFT, 2, 6.0)
    free = generate(target, [1, 5, 9], max_new_tokens=20, stop_at_eos=False)
    eos = free[6]
    out, _ = speculative_generate(target, draft, [1, 5, 9], max_new_tokens=20, eos_id=eos, k=4)
    assert out == free[: free.index(eos)]
    for n in (1, 2, 5):
        assert len(speculative_generate(target, draft, [1, 5], max_new_tokens=n, stop_at_eos=False, k=4)[0]) == n


def test_verify_rule_gives_target_distribution():
    # The accept/reject rule alone: drafts drawn from q, outputs must follow p, whatever q is.
    torch.manual_seed(0)
    V, k, n = 6, 2, 3000
    p_logits = torch.randn(k + 1, V) * 2
    q = torch.softmax(torch.randn(k, V) * 2, -1)
    p = torch.softmax(p_logits, -1)
    cfg = SamplingConfig(temperature=1.0)
    g = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).T.tolist()  # (n, k)
    first = torch.zeros(V)
    for d in drafts:
        out, _ = verify(p_logits, d, q, cfg, g)
        first[out[0]] += 1
    assert _chi2_pvalue(first, p[0]) > 1e-3
    assert _chi2_pvalue(first, q[0]) < 1e-6  # the test has the power to tell p from q


def test_sampled_output_follows_target_distribution():
    # End to end with two tiny-vocabulary models: the joint law of the first two tokens must be the target's.
    V = 4
    tcfg = TARGET.replace(vocab_size=V, n_layers=1)
    dcfg = DRAFT.replace(vocab_size=V)
    target, draft = _model(tcfg, 3, 40.0), _model(dcfg, 4, 40.0)
    prompt = [1, 2, 3]
    cfg = SamplingConfig(max_new_tokens=2, temperature=1.0, stop_at_eos=False)
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = torch.stack([target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(V)])
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
    joint = (p1[:, None] * p2).flatten()
    assert (p1 - q1).abs().sum() > 0.5  # the draft really is a different distribution
    counts = torch.zeros(V * V)
    n = 1200
    accepted = proposed = 0
    for seed in range(n):
        out, stats = speculative_generate(target, draft, prompt, cfg.replace(seed=seed), k=2)
        counts[out[0] * V + out[1]] += 1
        accepted += stats.accepted
        proposed += stats.proposed
    assert 0 < accepted < proposed
    assert _chi2_pvalue(counts, joint) > 1e-3
    draft_first = torch.zeros(V)
    for a in range(V):
        draft_first[a] = counts.view(V, V)[a].sum()
    assert _chi2_pvalue(draft_first, q1) < 1e-6


def test_rejects_mismatched_pairs_and_options():
    target = _model(TARGET, 1, 1.0)
    with pytest.raises(GenerationError, match="share a tokenizer"):
        speculative_generate(target, _model(DRAFT.replace(vocab_size=300), 1, 1.0), [1, 2])
    with pytest.raises(GenerationError, match="repetition_penalty"):
        speculative_generate(target, _model(DRAFT, 1, 1.0), [1, 2], repetition_penalty=1.2)
    with pytest.raises(GenerationError, match="k"):
        speculative_generate(target, _model(DRAFT, 1, 1.0), [1, 2], k=0)
