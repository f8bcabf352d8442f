"""Every ```python block of README.md runs as written.

The blocks are extracted from README.md in order and named by their index and first lines
(``SNIPPETS``), so that an added, removed or reordered block fails loudly. Each one runs
unchanged, after a preamble that defines only what the prose leaves to the user (``base_model``,
``loader``, ``unet``, ``training_args``, ...: tiny models built from configs, nothing
downloaded), and before an epilogue that checks what its comments promise. The DDP and FSDP2
blocks run as the README says, as scripts under ``torchrun --nproc_per_node=2`` (gloo). Files
the blocks write (adapters) go to ``tmp_path``, the working directory of every test.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from test_trainer import tiny_llama

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# name: (index among the ```python blocks, how the block starts)
SNIPPETS = {
    "usage": (0, "import torch, riemannlora\nfrom peft import LoraConfig, get_peft_model\n"),
    "loi": (1, "del opt, sched  # the ScaledAdamW above"),
    "pairs": (2, "import riemannlora\n\npairs = [riemannlora.LoraPair("),
    "diffusers": (3, "import riemannlora\nfrom peft import LoraConfig\n\nunet.add_adapter("),
    "trainer-loi": (
        4,
        "import riemannlora\nfrom riemannlora.integrations.trainer import RiemannTrainer, "
        "init_loi_from_trainer\n",
    ),
    "trainer": (
        5,
        "import riemannlora\nfrom riemannlora.integrations.trainer import RiemannTrainer\n\n",
    ),
    "trl": (6, "import riemannlora\nfrom trl import SFTConfig\n"),
    "ddp": (7, "import torch, torch.distributed as dist, riemannlora as rl\n"),
    "fsdp2": (8, "from torch.distributed.checkpoint.state_dict import"),
}


def _blocks() -> list[tuple[int, str]]:
    """(first line number in README.md, source) of every ```python block, in order."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    ]


def snippet(name: str) -> tuple[int, str]:
    index, first = SNIPPETS[name]
    blocks = _blocks()
    assert index < len(blocks), f"README.md has no python block #{index} ({name})"
    line, src = blocks[index]
    assert src.startswith(first), (
        f"python block #{index} of README.md (line {line}) should be the {name!r} snippet, "
        f"starting with {first!r}; it starts with {src[: len(first)]!r}: update SNIPPETS"
    )
    return line, src


def run(name: str, ns: dict) -> dict:
    """Runs the snippet in ``ns``; tracebacks point at README.md's own lines."""
    line, src = snippet(name)
    exec(compile("\n" * (line - 1) + src, str(README), "exec"), ns)
    return ns


def test_the_tests_cover_every_python_block_in_order():
    blocks = _blocks()
    assert len(blocks) == len(SNIPPETS), "a python block was added or removed: update SNIPPETS"
    for name in SNIPPETS:
        snippet(name)  # the first line matches


# --------------------------------------------------------------------- the placeholders
def tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def classifier_loader(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, 64, (4, 8), generator=g),
            "labels": torch.randint(0, 2, (4,), generator=g),
        }
        for _ in range(n)
    ]


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ single-process snippets
def test_usage_scaled_adamw_then_riemannion_with_loi_and_export(tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)
    ns = run("usage", {"base_model": tiny_classifier(), "loader": classifier_loader()})
    run("loi", ns)  # continues the first block (the same model)
    model = ns["model"]
    head = "base_model.model.classifier.modules_to_save.default.weight"
    assert dict(model.named_parameters())[head].requires_grad  # the head is trained in full
    assert not any("classifier" in n for n, _ in model.named_parameters() if "lora_" in n)
    assert ns["opt"].skipped_steps == 0
    # "PeftModel.from_pretrained(base, "my-adapter")": the exported adapter is the trained model
    loaded = PeftModel.from_pretrained(tiny_classifier(), "my-adapter").eval()
    batch = classifier_loader(1)[0]
    with torch.no_grad():
        want = model.eval()(**batch).logits
        got = loaded(**batch).logits
    assert max_diff(got, want) < 1e-5
    assert max_diff(got, tiny_classifier()(**batch).logits) > 1e-4  # and it was trained


def test_explicit_lora_pairs_for_a_model_without_peft():
    torch.manual_seed(0)
    layer = nn.Module()
    layer.down = nn.Linear(16, 4, bias=False)
    layer.up = nn.Linear(4, 16, bias=False)
    head = nn.Linear(16, 3)
    ns = run("pairs", {"layer": layer, "head": head})

    before = [p.detach().clone() for p in (layer.down.weight, layer.up.weight, head.weight)]
    x = torch.randn(8, 16)
    head(x + 2.0 * layer.up(layer.down(x))).square().mean().backward()
    ns["opt"].step()
    after = (layer.down.weight, layer.up.weight, head.weight)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # every tensor is trained


def test_diffusers_unet_add_adapter_riemannion_and_export(tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)
    unet = tiny_unet()
    ns = run("diffusers", {"unet": unet})
    assert (tmp_path / "unet-adapter" / "adapter_model.safetensors").is_file()

    # the "..." of the block: one noise-prediction step, then the comment's way back
    opt = ns["opt"]
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
    t = torch.tensor([10, 500])
    noise = torch.randn(2, 1, 8, 8, generator=g)
    nn.functional.mse_loss(unet(x, t, text).sample, noise).backward()
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 0
    ns["riemannlora"].export_adapter(unet, "unet-adapter")
    loaded = PeftModel.from_pretrained(tiny_unet(), "unet-adapter")
    with torch.no_grad():
        want = unet(x, t, text).sample
        got = loaded(x, t, text).sample
        base = tiny_unet()(x, t, text).sample
    assert max_diff(got, want) < 1e-5
    assert max_diff(got, base) > 1e-6  # the step changed the adapter


def trainer_placeholders(tmp_path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    g = torch.Generator().manual_seed(1)
    train = []
    for _ in range(8):
        ids = torch.randint(0, 64, (16,), generator=g)
        train.append({"input_ids": ids, "labels": ids})
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        save_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return {"peft_model": peft_model, "training_args": training_args, "train": train}


def test_trainer_riemannion_with_loi_from_a_trainer_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run("trainer-loi", trainer_placeholders(tmp_path))
    trainer = ns["trainer"]
    assert trainer.state.global_step == 2
    opt = trainer.optimizer.optimizer  # inside Accelerate's wrapper
    assert type(opt).__name__ == "Riemannion"
    assert opt.skipped_steps == 0


@pytest.mark.slow
def test_trl_sft_trainer_with_riemannion_and_loi(tmp_path, monkeypatch):
    """The TRL snippet on a real model and real data (SmolLM2-135M, 8 E2E pairs: one step)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from riemannlora.bench.assets import SMOLLM2_ID, load_causal_lm
    from test_trl import e2e_pairs

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base, tokenizer = load_causal_lm(SMOLLM2_ID)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ns = run(
        "trl",
        {
            "peft_model": get_peft_model(base, config),
            "dataset": e2e_pairs(8),
            "tokenizer": tokenizer,
        },
    )
    trainer = ns["trainer"]
    assert trainer.state.global_step == 1
    assert type(trainer.optimizer.optimizer).__name__ == "Riemannion"
    ids = tokenizer(["name[Aromi], eatType[coffee shop]"], return_tensors="pt")
    fresh, _ = load_causal_lm(SMOLLM2_ID)
    loaded = PeftModel.from_pretrained(fresh, "sft").eval()
    with torch.no_grad():
        want = trainer.model.eval()(**ids).logits
        assert max_diff(loaded(**ids).logits, want) < 1e-3


def test_trainer_scaled_adamw_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run("trainer", trainer_placeholders(tmp_path))
    trainer = ns["trainer"]
    assert trainer.state.global_step == 2
    assert type(trainer.optimizer.optimizer).__name__ == "ScaledAdamW"
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    trainer.train(resume_from_checkpoint=True)  # "resume later with ...": from checkpoint-2
    assert trainer.state.global_step >= 2


# ------------------------------------------------------------- DDP and FSDP2, 2 processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, cwd: pathlib.Path) -> None:
    """``torchrun --nproc_per_node=2 script.py`` in ``cwd``, as the README says (gloo)."""
    path = cwd / "script.py"
    path.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for _ in range(3):  # another process may take the free port before torchrun binds it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", str(path)]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        if "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


DDP_EPILOGUE = """
# ---- test epilogue: what each rank drew and holds, and the adapter against the model
import os as _os
from peft import PeftModel as _PeftModel
_rank = int(_os.environ["RANK"])
_probe = torch.arange(32).reshape(2, 16) % 128
with torch.no_grad():
    _logits = model.eval()(input_ids=_probe).logits
    if _rank == 0:  # "standard PEFT adapter": loads onto the original base with vanilla PEFT
        torch.manual_seed(0)
        _ref = _PeftModel.from_pretrained(LlamaForCausalLM(config), "adapter").eval()
        torch.manual_seed(0)
        _base = LlamaForCausalLM(config).eval()
        _dump_ref = (_ref(input_ids=_probe).logits, _base(input_ids=_probe).logits)
    else:
        _dump_ref = None
torch.save({
    "ids": ids,
    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    "skipped": opt.skipped_steps,
    "logits": _logits,
    "ref": _dump_ref,
}, f"rank{_rank}.pt")
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_snippet_under_torchrun(tmp_path):
    _, src = snippet("ddp")
    torchrun(src + DDP_EPILOGUE, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    # "this rank's part of the global batch": the ranks train on different data
    assert not torch.equal(r0["ids"], r1["ids"]), "every rank drew the same batch"
    # "gradients all-reduced": every replica holds the same weights, bit for bit
    assert r0["params"].keys() == r1["params"].keys()
    assert any("lora_" in n for n in r0["params"])
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
    assert r0["skipped"] == r1["skipped"] == 0
    # "standard PEFT adapter": vanilla PEFT loads it onto the base and gives the trained model
    loaded, base = r0["ref"]
    assert max_diff(loaded, r0["logits"]) < 1e-5
    assert max_diff(loaded, base) > 1e-4  # and training moved it


FSDP_EPILOGUE = """
# ---- test epilogue: what each rank drew, the factors' sharding, the adapter against the model
import os as _os
from peft import PeftModel as _PeftModel
from torch.distributed.tensor import DTensor as _DTensor, Shard as _Shard
_rank = dist.get_rank()
_lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
_probe = torch.arange(32).reshape(2, 16) % 128
with torch.no_grad():
    _logits = model.eval()(input_ids=_probe).logits  # every rank: FSDP gathers the weights
    if _rank == 0:
        torch.manual_seed(0)
        _ref = _PeftModel.from_pretrained(LlamaForCausalLM(config), "adapter").eval()
        torch.manual_seed(0)
        _base = LlamaForCausalLM(config).eval()
        _dump_ref = (_ref(input_ids=_probe).logits, _base(input_ids=_probe).logits)
    else:
        _dump_ref = None
torch.save({
    "ids": ids,
    "n_lora": len(_lora),
    "sharded": all(isinstance(p, _DTensor) and tuple(p.placements) == (_Shard(0),)
                   for p in _lora.values()),
    "skipped": opt.skipped_steps,
    "logits": _logits,
    "ref": _dump_ref,
}, f"rank{_rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_snippet_under_torchrun(tmp_path):
    _, ddp = snippet("ddp")
    _, src = snippet("fsdp2")
    # "as above": the DDP block's imports, process group, seed and config (up to its model)
    preamble = ddp.split("\nmodel = ")[0] + "\n"
    assert "config = " in preamble and "init_process_group" in preamble
    torchrun(preamble + src + FSDP_EPILOGUE, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert not torch.equal(r0["ids"], r1["ids"]), "every rank drew the same batch"
    assert r0["n_lora"] == r1["n_lora"] == 8  # 2 layers x q_proj, v_proj x lora_A, lora_B
    assert r0["sharded"] and r1["sharded"]  # "the factors become DTensors sharded on dim 0"
    assert r0["skipped"] == r1["skipped"] == 0
    assert torch.equal(r0["logits"], r1["logits"])
    loaded, base = r0["ref"]
    assert max_diff(loaded, r0["logits"]) < 1e-5  # the exported adapter is the trained model
    assert max_diff(loaded, base) > 1e-4
