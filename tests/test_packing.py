"""data.packing: rows packed into sequences of at most data.max_length tokens give the loss and gradients of the
same rows unpadded-and-batched (within fp32 rounding), on eager and sdpa attention; an attention implementation
that does not honour packed rows is refused in one line."""
from __future__ import annotations

import pytest
import torch

from molf_ds.commands.train.config import ConfigError, check_packing
from molf_ds.commands.train.data import IGNORE_INDEX, Collator, pack

PAD = 0


def rows(seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of 5-23 tokens, the first 2-6 a prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(9):
        n = int(torch.randint(5, 24, (1,), generator=g))
        prompt = int(torch.randint(2, 7, (1,), generator=g))
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_pack_keeps_rows_whole_within_max_length():
    features = rows()
    packs = pack(features, 40)
    assert all(len(p["input_ids"]) <= 40 for p in packs) and len(packs) < len(features)
    assert [i for p in packs for i in p["input_ids"]] == [i for f in features for i in f["input_ids"]]
    starts = [j for p in packs for j, position in enumerate(p["position_ids"]) if position == 0]
    assert len(starts) == len(features)
    assert all(p["labels"][j] == IGNORE_INDEX for p in packs for j, q in enumerate(p["position_ids"]) if q == 0)


def _loss_and_grads(model, features):
    model.zero_grad()
    loss = model(**Collator(PAD)(features), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_batch_has_the_unpacked_loss_and_gradients(tiny, arch, attention):
    model = tiny(arch, seed=2)
    model.set_attn_implementation(attention)
    features = rows(1)
    want_loss, want = _loss_and_grads(model, features)
    packs = pack(features, 48)
    assert 1 < len(packs) < len(features)
    loss, grads = _loss_and_grads(model, packs)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-6, msg=name)
    # the mask matters: the packed rows read as one sequence give another loss
    merged = [{key: value for key, value in p.items() if key != "position_ids"} for p in packs]
    assert abs(_loss_and_grads(model, merged)[0] - want_loss) > 1e-3


def test_an_attention_that_ignores_packed_rows_is_refused():
    check_packing(None)
    check_packing("sdpa")
    with pytest.raises(ConfigError, match=r"^config key 'data.packing': model.attn_implementation='paged_attention' "
                                          r"does not keep attention within packed rows: set"):
        check_packing("paged_attention")
