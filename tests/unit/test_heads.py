import json
from collections import OrderedDict

import pytest
import torch

from nbkit.medusa.heads import HeadsFormatError, MedusaHeads, load_heads, save_heads

H, V = 32, 50


def fasterdecoding_state(n_heads=5, dtype=torch.bfloat16):
    """Keys and shapes of FasterDecoding/medusa-vicuna-7b-v1.3's medusa_lm_head.pt (scaled down)."""
    torch.manual_seed(0)
    state = OrderedDict()
    for i in range(n_heads):
        state[f"{i}.0.linear.weight"] = torch.randn(H, H, dtype=dtype)
        state[f"{i}.0.linear.bias"] = torch.randn(H, dtype=dtype)
        state[f"{i}.1.weight"] = torch.randn(V, H, dtype=dtype)
    return state


def test_fasterdecoding_pt_reads_head_count_from_weights(tmp_path):
    state = fasterdecoding_state()
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    heads = load_heads(tmp_path, hidden_size=H)
    assert heads.n_heads == 5 and not heads.shared_lm_head and heads.vocab_size == V
    x = torch.randn(3, H)
    out = heads(x)
    assert out.shape == (5, 3, V)
    # head 2 by hand: x + silu(W x + b), then its own lm_head, computed from the bf16 weights
    w, b = state["2.0.linear.weight"].float(), state["2.0.linear.bias"].float()
    lm = state["2.1.weight"].float()
    ref = (x + torch.nn.functional.silu(x @ w.T + b)) @ lm.T
    torch.testing.assert_close(out[2], ref, rtol=1e-5, atol=1e-5)


def test_shared_lm_head_safetensors_roundtrip(tmp_path):
    heads = MedusaHeads(H, 3)
    for p in heads.parameters():
        p.data.normal_()
    save_heads(heads, tmp_path, base_model="tiny")
    loaded = load_heads(tmp_path, hidden_size=H)
    assert loaded.shared_lm_head and loaded.n_heads == 3 and loaded.config["base_model"] == "tiny"
    lm_head = torch.nn.Linear(H, V, bias=False)
    x = torch.randn(4, H)
    torch.testing.assert_close(loaded(x, lm_head), heads(x, lm_head))
    with pytest.raises(ValueError, match="lm_head"):
        loaded(x)
    assert loaded.topk(x, lm_head, 5).shape == (4, 3, 5)


def test_wrong_shape_names_the_key(tmp_path):
    state = fasterdecoding_state(2)
    state["1.0.linear.bias"] = torch.zeros(H + 1)
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(HeadsFormatError, match=r"'1\.0\.linear\.bias' has shape"):
        load_heads(tmp_path, hidden_size=H)


def test_missing_and_unexpected_keys(tmp_path):
    state = fasterdecoding_state(2)
    del state["1.0.linear.bias"]
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(HeadsFormatError, match=r"missing key '1\.0\.linear\.bias'"):
        load_heads(tmp_path / "a.pt", hidden_size=H)
    state = fasterdecoding_state(2)
    state["medusa_head.0.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "b.pt")
    with pytest.raises(HeadsFormatError, match="unexpected key 'medusa_head.0.weight'"):
        load_heads(tmp_path / "b.pt", hidden_size=H)


def test_corrupted_file_is_a_clear_error(tmp_path):
    torch.save(fasterdecoding_state(2), tmp_path / "medusa_lm_head.pt")
    data = (tmp_path / "medusa_lm_head.pt").read_bytes()
    (tmp_path / "medusa_lm_head.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(HeadsFormatError, match="cannot read Medusa checkpoint"):
        load_heads(tmp_path, hidden_size=H)
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadsFormatError, match="cannot read"):
        load_heads(tmp_path / "x.safetensors", hidden_size=H)
    with pytest.raises(FileNotFoundError):
        load_heads(tmp_path / "nothing-here", hidden_size=H)


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"0.0.linear.weight": Evil()}, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(HeadsFormatError):
        load_heads(tmp_path, hidden_size=H)


def test_proposal_vocabulary_restricts_candidates_and_matches_the_full_topk(tmp_path):
    torch.manual_seed(0)
    hidden, vocab = 16, 300
    heads = MedusaHeads(hidden, 3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    allowed = list(range(0, vocab, 3))  # every third token
    save_heads(heads, tmp_path, proposal_vocab=allowed)
    loaded = load_heads(tmp_path, hidden)
    assert loaded.proposal_vocab.tolist() == allowed
    x = torch.randn(5, hidden)
    top = loaded.topk(x, lm_head, 10)  # [5, 3, 10]
    assert set(top.flatten().tolist()) <= set(allowed)
    # same candidates, same order, as the full top-k with the other tokens masked out
    full = loaded(x, lm_head).transpose(0, 1)  # [5, 3, V]
    masked = torch.full_like(full, float("-inf"))
    masked[..., allowed] = full[..., allowed]
    assert torch.equal(top, masked.topk(10, dim=-1).indices)
    loaded.proposal_vocab = None
    assert torch.equal(loaded.topk(x, lm_head, 10), full.topk(10, dim=-1).indices)


@pytest.mark.parametrize("content", ["[1, 2, oops", "[]", '{"a": 1}', "[1, 2, 3]", "[-1" + ", 5" * 20 + "]"])
def test_bad_proposal_vocabulary_is_a_clear_error(tmp_path, content):
    save_heads(MedusaHeads(16, 2), tmp_path)
    (tmp_path / "proposal_vocab.json").write_text(content)
    with pytest.raises(HeadsFormatError, match="proposal_vocab.json"):
        load_heads(tmp_path, 16)


def test_proposal_vocabulary_beyond_the_model_vocabulary_is_a_clear_error(tmp_path):
    save_heads(MedusaHeads(16, 2), tmp_path, proposal_vocab=list(range(100, 400)))
    heads = load_heads(tmp_path, 16)
    with pytest.raises(HeadsFormatError, match="proposal vocabulary holds token 399"):
        heads.topk(torch.randn(1, 16), torch.nn.Linear(16, 300, bias=False), 10)


def test_int8_cpu_lm_head_slices_to_the_proposal_vocabulary(tmp_path):
    from nbkit.engine.llamacpp.lm_head import Int8LmHead

    torch.manual_seed(0)
    hidden, vocab = 32, 500
    dense = torch.nn.Linear(hidden, vocab, bias=False)
    int8 = Int8LmHead(dense)
    heads = MedusaHeads(hidden, 2)
    allowed = list(range(1, vocab, 2))
    save_heads(heads, tmp_path, proposal_vocab=allowed)
    loaded = load_heads(tmp_path, hidden)
    x = torch.randn(3, hidden)
    top = loaded.topk(x, int8, 10)
    assert set(top.flatten().tolist()) <= set(allowed)
    # the int8 slice ranks like the dense fp32 slice (rounding may swap near-ties only)
    exact = loaded.topk(x, dense, 10)
    assert (top[..., :3] == exact[..., :3]).float().mean() > 0.8
