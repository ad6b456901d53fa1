"""The PyTorch peers of ``train_step.py``: the same Llama, batch, LoRA and optimizer on PyTorch,
trained in full and with HF PEFT's LoRA. ``train_step.py`` runs them as its modes ``torch-full``
and ``peft`` (one process each), so that one table compares jlora with the library it means to
beat, measured in the same run on the same device.

    python benchmarks/train_step.py --modes floor,jlora,full,torch-full,peft
    python benchmarks/train_step.py --preset llama-1b --modes floor,jlora,full,torch-full,peft   # GPU

Each peer runs as its users run it by default: ``LlamaForCausalLM`` built from the same
``LlamaConfig`` (SDPA attention, eager PyTorch, no ``torch.compile``), weights in the preset's
dtype, ``torch.optim.AdamW(lr=1e-4)`` (fused on a GPU) over the trainable parameters, and for
``peft`` ``get_peft_model`` with r and alpha as jlora's, no dropout, on the same seven targets
(PEFT keeps the adapters in float32 on a bf16 base, as jlora does).
"""

from __future__ import annotations

import time

MODES = ("torch-full", "peft")


def run_torch_mode(mode: str, preset: dict, targets: tuple[str, ...]) -> dict:
    """Time ``preset["steps"]`` training steps of ``mode`` (``"torch-full"`` or ``"peft"``); the
    result has ``train_step.run_mode``'s keys (no compile: eager PyTorch has none)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if mode not in MODES:
        raise ValueError(f"unknown PyTorch mode {mode!r}; expected one of {MODES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, preset["dtype"])
    config = LlamaConfig(
        hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_key_value_heads"], vocab_size=preset["vocab_size"],
        max_position_embeddings=preset["seq"], rope_theta=500000.0, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype)
    if mode == "peft":
        import peft

        rank = preset["rank"]
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (preset["batch"], preset["seq"] + 1), generator=generator).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> torch.Tensor:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, config.vocab_size), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up
        step()
    sync()
    steps = preset["steps"]
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    cuda = device.type == "cuda"
    return dict(
        mode=mode, step_ms=1e3 * step_s, tokens_per_s=preset["batch"] * preset["seq"] / step_s,
        compile_s=None, trace_s=None, peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        footprint_bytes=None, loss=float(loss), flops=None,
        adapter_params=sum(p.numel() for p in trainable) if mode == "peft" else 0,
        device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
    )
