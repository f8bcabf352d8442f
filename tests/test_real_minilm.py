"""Real model, real data: PEFT LoRA on all-MiniLM-L6-v2, trained on BIG-bench MultiEmo sentences."""

from __future__ import annotations

import pytest
import torch

import riemannlora as rl

pytestmark = pytest.mark.slow

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _lora_minilm():
    from peft import LoraConfig, TaskType, get_peft_model

    from riemannlora.assets import load_sequence_classifier

    torch.manual_seed(0)
    model, tok = load_sequence_classifier(MINILM, num_labels=4)
    cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value", "dense"],
    )
    return get_peft_model(model, cfg), tok


@pytest.fixture(scope="module")
def data():
    from riemannlora.assets import load_sequence_classifier
    from riemannlora.tasks import Collator, load_task

    _, tok = load_sequence_classifier(MINILM, num_labels=4)
    train = load_task("multiemo", tok, "train", n=8 * 30, max_length=48)
    collate = Collator.for_tokenizer(tok)
    held_out = collate(load_task("multiemo", tok, "eval", n=96, max_length=48))
    return [collate(train[i : i + 8]) for i in range(0, len(train), 8)], held_out


def _eval_loss(model, batch):
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3),
        lambda m: rl.ScaledAdamW(m, lr=1e-3),
        lambda m: rl.ScaledSGD(m, lr=0.3),
    ],
    ids=["AdamW", "ScaledAdamW", "ScaledSGD"],
)
def test_eval_loss_goes_down(make_opt, data):
    """30 steps (batch 8) lower the loss on 96 held-out sentences by a clear margin."""
    torch.set_num_threads(2)
    train, held_out = data
    model, _ = _lora_minilm()
    pairs = rl.find_lora_pairs(model)
    # per layer: query, key, value and three "dense" (attention output, intermediate, output),
    # plus the pooler's dense
    assert len(pairs) == 6 * 6 + 1
    opt = make_opt(model)
    before = _eval_loss(model, held_out)
    model.train()
    for batch in train:
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _eval_loss(model, held_out)
    assert after < before - 0.04, (before, after)
