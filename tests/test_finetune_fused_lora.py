"""The fused LoRA layer (tools/finetune/fused_lora.py) against peft's own forward, on CPU in fp32: the same
loss and the same adapter and input gradients (to float rounding), with and without LoRA dropout, switched on
and back; the layers it must leave to peft are left. Its speed is measured on the H200 (speed_bench.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from runs import speed_run, tiny_lora_model  # noqa: E402

from tools.finetune import fused_lora  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")


def batch():
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model):
    model.train()
    inputs = batch()
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=inputs["labels"]).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, embeds.grad.detach().clone()


def set_dropout(model, dropout):
    """Every LoRA layer's dropout module replaced by ``dropout`` (a probability: ``nn.Dropout`` of it)."""
    module_ = torch.nn.Dropout(dropout) if isinstance(dropout, float) else dropout
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = module_
    return model


def close(a, b, tol=1e-5) -> bool:
    return float((a - b).norm() / b.norm().clamp(min=1e-12)) < tol


def test_the_same_loss_and_gradients_as_peft(tiny):
    model = tiny_lora_model(tiny)
    ref_loss, ref_grads, ref_dx = loss_and_grads(model)
    state = fused_lora.enable(model)
    assert len(state) == 7 * 2 and not state.skipped     # 7 linear layers × 2 decoder layers, all taken
    loss, grads, dx = loss_and_grads(model)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        assert close(grads[name], ref_grads[name]), name
    assert close(dx, ref_dx)                  # the gradient reaching the input embeddings: every layer's dx
    fused_lora.restore(state)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert abs(loss_and_grads(model)[0] - ref_loss) < 1e-6 * abs(ref_loss)


def saved_widths(model, width: int) -> int:
    """How many distinct activations of ``width`` features (one row per token) one training step keeps for its
    backward."""
    kept: set = set()
    tokens = batch()["input_ids"].numel()

    def pack(t):
        if t.numel() == tokens * width:
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_and_grads(model)
    return len(kept)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recomputed_mlp_gives_the_same_step_and_keeps_less(tiny, dropout):
    """recompute_mlp: the down projection's input silu(gate) · up is computed again in the backward instead of
    kept. The same loss and gradients as the fused layers alone (the same dropout seeds) and as peft's without
    dropout; per decoder layer two intermediate-width tensors kept (gate, up) instead of four; restore undoes
    it."""
    model = set_dropout(tiny_lora_model(tiny), dropout)
    inter = model.config.intermediate_size
    torch.manual_seed(4)
    ref_loss, ref_grads, ref_dx = loss_and_grads(model)
    plain_kept = saved_widths(model, inter)
    state = fused_lora.enable(model)
    torch.manual_seed(4)
    fused = loss_and_grads(model)
    fused_kept = saved_widths(model, inter)
    fused_lora.restore(state)
    state = fused_lora.enable(model, recompute_mlp=True)
    assert len(state) == 14 and len(state.mlps) == 2
    assert all(type(m).__name__ == "LlamaMLP" for m in state.mlps)
    torch.manual_seed(4)
    loss, grads, dx = loss_and_grads(model)
    assert abs(loss - fused[0]) <= 1e-6 * abs(loss) and close(dx, fused[2])
    assert all(close(grads[n], fused[1][n]) for n in grads) and len(grads) == 28
    if not dropout:
        assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss) and close(dx, ref_dx)
        assert all(close(grads[n], ref_grads[n]) for n in grads)
    assert saved_widths(model, inter) == 2 * 2 < fused_kept <= plain_kept
    fused_lora.restore(state)
    assert not state.mlps and all("forward" not in m.__dict__ for m in model.modules())


def test_recomputed_mlp_follows_disabled_adapters_and_leaves_other_mlps(tiny):
    """A disabled adapter inside a recomputing MLP falls back to peft's layer; an MLP whose down projection is
    not adapted, or that is not a SwiGLU MLP of transformers, keeps its own forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = tiny_lora_model(tiny)
    fused_lora.enable(model, recompute_mlp=True)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        assert close(model(**batch()).logits, plain(**batch()).logits)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    attention_only = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    state = fused_lora.enable(attention_only, recompute_mlp=True)
    assert len(state) == 4 and not state.mlps

    class OwnMLP(torch.nn.Module):            # the right names, but a forward of its own
        def __init__(self, mlp):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.config = (mlp.gate_proj, mlp.up_proj,
                                                                         mlp.down_proj, mlp.config)

    assert fused_lora._swiglu_mlp(plain.model.layers[0].mlp) and not fused_lora._swiglu_mlp(
        OwnMLP(plain.model.layers[0].mlp))


def test_the_fused_function_really_runs(tiny, monkeypatch):
    model = tiny_lora_model(tiny)
    fused_lora.enable(model)
    seen = []
    original = fused_lora._base_matmul
    monkeypatch.setattr(fused_lora, "_base_matmul", lambda base, rows: seen.append(base) or original(base, rows))
    loss_and_grads(model)
    assert len(seen) == 14


def test_dropout_uses_one_mask_for_forward_and_backward(tiny, monkeypatch):
    """With LoRA dropout the fused layer equals peft's when both drop the same positions."""

    model = tiny_lora_model(tiny)
    p = 0.3
    masks: dict[tuple, torch.Tensor] = {}

    def fixed_mask(rows, p_, seed=None):
        assert p_ == p
        key = tuple(rows.shape)
        if key not in masks:
            masks[key] = torch.rand(rows.shape, generator=torch.Generator().manual_seed(rows.shape[-1])) >= p
        return masks[key]

    class FixedDropout(torch.nn.Dropout):
        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1])
            return (rows * fixed_mask(rows, self.p) / (1 - self.p)).reshape(x.shape)

    set_dropout(model, FixedDropout(p))
    ref_loss, ref_grads, ref_dx = loss_and_grads(model)
    monkeypatch.setattr(fused_lora, "_dropout_mask", fixed_mask)
    state = fused_lora.enable(model)
    assert len(state) == 14
    loss, grads, dx = loss_and_grads(model)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for name in grads:
        assert close(grads[name], ref_grads[name]), name
    assert close(dx, ref_dx)
    no_dropout = fused_lora.restore(state) or tiny_lora_model(tiny)
    assert abs(loss_and_grads(no_dropout)[0] - loss) > 1e-4      # the mask did change the loss


def test_dropout_mask_is_drawn_again_from_its_seed(tiny):
    """Without a fixed mask: the backward's mask is the forward's (the input gradient of the LoRA path only
    flows through kept positions), and the same global seed gives the same step."""
    model = tiny_lora_model(tiny)
    set_dropout(model, 0.4)
    fused_lora.enable(model)
    torch.manual_seed(11)
    first = loss_and_grads(model)
    torch.manual_seed(11)
    again = loss_and_grads(model)
    assert first[0] == again[0] and all(torch.equal(first[1][n], again[1][n]) for n in first[1])
    rows = torch.randn(64, 32)
    mask = fused_lora._dropout_mask(rows, 0.4, 5)
    assert torch.equal(mask, fused_lora._dropout_mask(rows, 0.4, 5)) and 0.45 < mask.float().mean() < 0.75
    assert torch.allclose(fused_lora._dropped(rows, 0.4, 5), rows * mask / 0.6)


def test_device_seeds_come_from_one_counter_the_model_call_advances(tiny, monkeypatch):
    """device_seeds (what CUDA graphs of the layers need): layer i draws its mask from counter + i, forward and
    backward alike; each call of the model moves the counter past every layer's seed, so the next step draws new
    masks; the start comes from the global generator (a seeded run repeats); restore removes the hook."""
    from collections import Counter

    model = tiny_lora_model(tiny)
    set_dropout(model, 0.3)
    seen = []
    original = fused_lora._dropout_mask
    monkeypatch.setattr(fused_lora, "_dropout_mask", lambda rows, p, seed: seen.append(seed) or original(rows, p, seed))
    torch.manual_seed(5)
    state = fused_lora.enable(model, device_seeds=True)
    n, start = len(state), int(state.seeds.counter)
    assert n == 14 and state.seeds.counter.dtype == torch.int64
    first = loss_and_grads(model)
    step = [start + n + i for i in range(n)]
    assert seen[:n] == step                                       # the forward, in layer order
    assert Counter(seen[n:]) == {seed: 2 for seed in step}       # A's gradient and dx redraw each layer's mask
    assert int(state.seeds.counter) == start + n
    seen.clear()
    second = loss_and_grads(model)
    assert seen[:n] == [seed + n for seed in step] and second[0] != first[0]
    fused_lora.restore(state)
    assert state.hook is None and not model._forward_pre_hooks
    model = set_dropout(tiny_lora_model(tiny), 0.3)
    torch.manual_seed(5)
    fused_lora.enable(model, device_seeds=True)
    again = loss_and_grads(model)
    assert again[0] == first[0] and all(torch.equal(again[1][k], first[1][k]) for k in first[1])


def test_keeping_the_dropped_input_gives_the_same_step(tiny):
    """keep_dropped trades memory for a kernel pass: the same seeds, so the same loss and gradients."""
    results = []
    for keep in (False, True):
        model = tiny_lora_model(tiny)
        set_dropout(model, 0.3)
        fused_lora.enable(model, keep_dropped=keep)
        torch.manual_seed(9)
        results.append(loss_and_grads(model))
    (loss, grads, dx), (loss_kept, grads_kept, dx_kept) = results
    assert loss == loss_kept and close(dx_kept, dx)
    assert all(close(grads_kept[n], grads[n], 1e-6) for n in grads)


def test_eval_mode_has_no_dropout_and_no_graph(tiny):
    model = tiny_lora_model(tiny)
    set_dropout(model, 0.5)
    model.eval()
    with torch.no_grad():
        expected = model(**batch()).logits
        fused_lora.enable(model)
        got = model(**batch()).logits
    assert close(got, expected)


def test_layers_it_cannot_take_keep_peft(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    state = fused_lora.enable(model)
    assert len(state) == 0 and state.skipped == {"DoRA": 14}
    merged = tiny_lora_model(tiny)
    state = fused_lora.enable(merged)
    merged.merge_adapter()
    with torch.no_grad():            # merged: peft's forward (the adapter already sits in the weights)
        out = merged(**batch()).logits
    merged.unmerge_adapter()
    with torch.no_grad():
        assert close(merged(**batch()).logits, out, 1e-4)


def test_disabled_adapters_and_another_active_adapter_fall_back_to_peft(tiny):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = tiny_lora_model(tiny)
    fused_lora.enable(model)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():           # the base model's output, as peft gives it
            assert close(model(**batch()).logits, plain(**batch()).logits)
        with_adapter = model(**batch()).logits
        assert not close(with_adapter, plain(**batch()).logits, 1e-3)
        from peft import LoraConfig

        model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear"))   # B = 0: the base output
        model.set_adapter("other")
        assert close(model(**batch()).logits, plain(**batch()).logits)
        model.set_adapter("default")
        assert close(model(**batch()).logits, with_adapter)


def test_callback_records_the_switch(tiny):
    from tools.finetune.speed import Speedups

    speed = Speedups()
    model = tiny_lora_model(tiny)
    cb = fused_lora.callback(speed)
    cb.on_train_begin(None, None, None, model=model)
    assert speed.applied == ["fused_lora"] and len(cb.state) == 14
    cb.on_train_end(None, None, None)
    assert cb.state is None and all("forward" not in m.__dict__ for m in model.modules())


def test_a_run_with_the_fused_layer_follows_the_plain_run(tiny, tmp_path):
    """The whole trainer path (spec.json "speed": {"fused_lora": true}, on CPU in fp32): the same losses step by
    step as peft's own layers, the switch recorded, peft's forward back before the adapter is saved."""
    from peft.tuners.lora import LoraLayer

    losses = {}
    runs = (("plain", {}), ("fused", {"fused_lora": True}), ("recompute", {"fused_lora": True, "recompute_mlp": True}))
    for name, speed in runs:
        outcome, summary, losses[name] = speed_run(tmp_path / name, tiny, speed)
        assert summary["speed"]["fused_lora"] == (name != "plain")
        assert ("fused_lora" in summary["speed"]["applied"]) == (name != "plain")
        assert ("recompute_mlp" in summary["speed"]["applied"]) == (name == "recompute")
        changed = [m for m in outcome.model.modules() if isinstance(m, LoraLayer) or hasattr(m, "down_proj")]
        assert len(changed) == 14 + 2 and all("forward" not in m.__dict__ for m in changed)   # restored before saving
    assert len(losses["fused"]) == len(losses["plain"]) == len(losses["recompute"]) >= 12
    assert losses["fused"][-1] < losses["fused"][0]
    for fused, recompute, plain in zip(losses["fused"], losses["recompute"], losses["plain"], strict=True):
        assert abs(fused - plain) <= 1e-4 * abs(plain) and abs(recompute - plain) <= 1e-4 * abs(plain)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_redraw_the_same_dropout(tiny, reentrant):
    """With gradient checkpointing (either kind) the recomputed forward draws the dropout seeds again from the
    restored global generator: the gradients equal those of the same step without checkpointing."""
    results = []
    for checkpointing in (False, True):
        model = tiny_lora_model(tiny)
        set_dropout(model, 0.3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        fused_lora.enable(model)
        torch.manual_seed(5)
        results.append(loss_and_grads(model))
    (loss, grads, _), (loss_ckpt, grads_ckpt, _) = results
    assert loss == pytest.approx(loss_ckpt, rel=1e-6)
    for name in grads:
        assert close(grads_ckpt[name], grads[name]), name


def test_the_switch_says_why_it_does_not_apply():
    from tools.finetune.speed import Speedups, fused_lora_callback

    speed = Speedups(recompute_mlp=True)
    assert fused_lora_callback(speed, "lora") is None and "fused_lora" in speed.skipped["recompute_mlp"]
    speed = Speedups(fused_lora=True, recompute_mlp=True)
    assert fused_lora_callback(speed, "qlora") is None and "4-bit" in speed.skipped["recompute_mlp"]

    for method, reason in (("qlora", "4-bit"), ("full", "no adapters")):
        speed = Speedups(fused_lora=True)
        assert fused_lora_callback(speed, method) is None and reason in speed.skipped["fused_lora"]
    assert fused_lora_callback(Speedups(), "lora") is None            # not asked for
    assert fused_lora_callback(Speedups(fused_lora=True), "lora") is not None
