"""The CUDA-graph plumbing of tools/finetune/layer_graphs.py on CPU: the graph step itself needs a GPU (it is
measured by evals/gpu/speed_bench.py variant fast_graphs), so here make_graphed_callables hands back the eager
callables it was given — what is checked is everything around it: each layer's inputs recorded from a real
forward, the layers replaced in order with the same loss and gradients, parameters and layer attributes still
reachable, and a batch the graphs were not captured for refused with a clear error."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from runs import tiny_lora_model  # noqa: E402

from tools.finetune import layer_graphs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")


def batch(length: int = 24):
    ids = torch.randint(5, 200, (2, length), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def packed_batch(length: int = 24):
    """Two rows, each holding two sequences (position ids restart; no attention mask: the model builds a
    block-diagonal one), the second row ending in padding (position 0 each, labels -100)."""
    inputs = batch(length)
    positions = torch.cat([torch.arange(10), torch.arange(length - 10)]).repeat(2, 1)
    positions[1, -4:] = 0
    labels = inputs["labels"].clone()
    labels[positions == 0] = -100
    return {"input_ids": inputs["input_ids"], "position_ids": positions, "labels": labels}


def loss_and_grads(model, inputs):
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.fixture
def eager_graphs(monkeypatch):
    """make_graphed_callables as a CPU can run it: the callables handed back as they are (a GPU would capture)."""
    captured = {}

    def eager(callables, samples, **kwargs):
        captured["samples"], captured["callables"] = samples, callables
        return callables

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", eager)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return captured


def same_step(model, inputs, ref):
    loss, grads = loss_and_grads(model, inputs)
    assert loss == pytest.approx(ref[0], rel=1e-6) and grads.keys() == ref[1].keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref[1][name], rtol=1e-5, atol=1e-7), name


def test_the_layers_are_graphed_in_order_with_the_same_step(tiny, eager_graphs):
    model = tiny_lora_model(tiny).train()
    model.config.use_cache = False
    ref, ref_short = loss_and_grads(model, batch()), loss_and_grads(model, batch(16))
    keys = list(model.state_dict())
    layers = layer_graphs.decoder_layers(model)
    originals = list(layers)
    assert layer_graphs.capture(model, batch()) == len(originals) > 1
    assert list(layers) == originals and all("_stackwise_graph" in layer.__dict__ for layer in layers)
    assert list(model.state_dict()) == keys                             # what gets saved does not change
    samples = eager_graphs["samples"]
    assert len(samples) == len(originals) and all(len(s) == 3 for s in samples)      # no mask: causal SDPA
    assert not samples[0][0].requires_grad and all(s[0].requires_grad for s in samples[1:])  # as in training
    assert tuple(samples[0][0].shape) == (2, 24, model.config.hidden_size)
    same_step(model, batch(), ref)
    assert "_stackwise_eager" not in layers[0].__dict__
    same_step(model, batch(16), ref_short)                              # another shape: the layers run eagerly
    assert layers[0]._stackwise_eager == 1
    model.eval()
    with torch.no_grad():
        model(**batch())
    assert layers[0]._stackwise_eager == 2                              # evaluation too
    assert layer_graphs.restore(model) == len(originals)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_packed_rows_are_graphed_with_their_block_diagonal_mask(tiny, eager_graphs):
    model = tiny_lora_model(tiny).train()
    model.config.use_cache = False
    ref, ref_plain = loss_and_grads(model, packed_batch()), loss_and_grads(model, batch())
    assert ref[0] != pytest.approx(ref_plain[0])                        # the packing changes what is attended
    layer_graphs.capture(model, packed_batch())
    slots = {call.slot for call in eager_graphs["callables"]}
    assert len(slots) == 1 and all(len(sample) == 3 for sample in eager_graphs["samples"])   # one mask buffer
    slot = slots.pop()
    mask = slot.buffer.clone()
    assert mask.shape == (2, 1, 24, 24)
    assert not bool(mask[0, 0, 12, 5]) and bool(mask[0, 0, 12, 11])     # no attention across the packed rows
    slot.buffer.zero_()
    same_step(model, packed_batch(), ref)                               # the step's mask copied in, once
    assert torch.equal(slot.buffer, mask) and slot.last is not None
    layer = layer_graphs.decoder_layers(model)[0]
    same_step(model, batch(), ref_plain)                                # no mask where one was captured: eager
    assert layer._stackwise_eager == 1


def test_with_mask_full_and_packed_batches_replay_the_same_graphs(tiny, eager_graphs):
    """with_mask (what the trainer uses): captured from a batch that needs no mask, the graphs take the causal
    mask for such batches and the block-diagonal one for packed batches of the same shape — no eager calls."""
    model = tiny_lora_model(tiny).train()
    model.config.use_cache = False
    assert model.config._attn_implementation == "sdpa"
    ref, ref_packed = loss_and_grads(model, batch()), loss_and_grads(model, packed_batch())
    layer_graphs.capture(model, batch(), with_mask=True)
    slot = eager_graphs["callables"][0].slot
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    assert slot.buffer.shape == (2, 1, 24, 24) and torch.equal(slot.buffer[0, 0], causal)
    same_step(model, batch(), ref)
    same_step(model, packed_batch(), ref_packed)
    assert not torch.equal(slot.buffer[0, 0], causal)                  # the packed batch's mask went in
    same_step(model, batch(), ref)                                      # and the causal one back
    layer = layer_graphs.decoder_layers(model)[0]
    assert "_stackwise_eager" not in layer.__dict__
    fewer = {k: v[:1] for k, v in batch().items()}                    # a smaller batch, no mask: eager, causal
    model.zero_grad(set_to_none=True)
    ref_fewer = float(model(**fewer).loss.detach())
    assert layer._stackwise_eager == 1 and ref_fewer > 0


def test_capture_on_the_first_training_step_and_a_failed_capture(tiny, eager_graphs, monkeypatch):
    model = tiny_lora_model(tiny).train()
    model.config.use_cache = False
    ref = loss_and_grads(model, batch())
    layer_graphs.capture_on_first_step(model, accumulating=True)
    with torch.no_grad():
        model.eval()(**batch())                                        # evaluation does not capture
    assert "_stackwise_graph" not in layer_graphs.decoder_layers(model)[0].__dict__
    same_step(model.train(), batch(), ref)
    layers = layer_graphs.decoder_layers(model)
    assert all("_stackwise_graph" in layer.__dict__ for layer in layers) and not model._forward_pre_hooks
    hooks = layers[0]._stackwise_grad_hooks
    assert len(hooks) == sum(p.requires_grad for p in layers[0].parameters()) > 0
    # two backward passes accumulate (each gradient copied out of what would be a graph's static buffer)
    model(**batch()).loss.backward()
    model(**batch()).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, 2 * ref[1][name], rtol=1e-5, atol=1e-7), name
    model.zero_grad(set_to_none=True)
    layer_graphs.restore(model)

    def broken(*_a, **_k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", broken)
    failures = []
    layer_graphs.capture_on_first_step(model, failed=failures.append)
    same_step(model, batch(), ref)                                      # the step runs, eagerly
    assert len(failures) == 1 and not any("_stackwise_graph" in m.__dict__ for m in layer_graphs.decoder_layers(model))


def test_it_says_why_it_cannot_graph(tiny):
    model = tiny_lora_model(tiny)
    if not torch.cuda.is_available():
        assert layer_graphs.why_not(model, lora_dropout=0.0) == "CUDA graphs need a GPU"
    else:
        assert "seed" in layer_graphs.why_not(model, lora_dropout=0.05)
        assert layer_graphs.why_not(model, lora_dropout=0.05, device_seeds=True) is None
    assert layer_graphs.decoder_layers(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("packing", [False, True])
def test_a_trainer_run_with_graphs_follows_the_fused_run(tiny, tmp_path, eager_graphs, monkeypatch, packing):
    """spec.json "speed": {"fused_lora": true, "cuda_graphs": true} through the whole trainer on CPU, with the
    GPU parts stood in for (no GPU check, make_graphed_callables eager): batches of max_seq_len rows with the
    packed-rows mask, the layers graphed at the first step and given back before the adapter is saved, the
    switch recorded, and the same losses as the fused run without graphs (no LoRA dropout: the two draw their
    masks differently)."""
    from runs import speed_run

    from tools.finetune import speed as speed_module

    monkeypatch.setattr(layer_graphs, "why_not", lambda *a, **k: None)
    wanted = speed_module.graphs_wanted
    monkeypatch.setattr(speed_module, "graphs_wanted", lambda speed, method, cuda: wanted(speed, method, cuda=True))
    runs = {}
    for name, speed in (("fused", {"fused_lora": True}), ("graphs", {"fused_lora": True, "cuda_graphs": True})):
        runs[name] = speed_run(tmp_path / name, tiny, speed, lora_dropout=0.0, packing=packing)
    outcome, summary, losses = runs["graphs"]
    assert "cuda_graphs" in summary["speed"]["applied"] and summary["speed"]["cuda_graphs"]
    hidden, mask = eager_graphs["samples"][0][0], eager_graphs["callables"][0].slot.buffer
    assert hidden.shape[:2] == (4, 128) and mask.shape == (4, 1, 128, 128)   # rows of max_seq_len, one mask shape
    layers = layer_graphs.decoder_layers(outcome.model)
    assert all("_stackwise_graph" not in layer.__dict__ for layer in layers)   # given back at the end
    fused = runs["fused"][2]
    assert len(losses) == len(fused) >= 12 and losses[-1] < losses[0]
    for got, want in zip(losses, fused, strict=True):
        assert abs(got - want) <= 1e-4 * abs(want)


def test_the_switch_says_why_it_does_not_apply():
    from tools.finetune.speed import Speedups, graphs_wanted, speedups, training_callbacks

    assert speedups({"cuda_graphs": True}).cuda_graphs and not speedups().cuda_graphs
    for method, reason in (("qlora", "4-bit"), ("full", "only for LoRA")):
        speed = Speedups(fused_lora=True, cuda_graphs=True)
        assert not graphs_wanted(speed, method, cuda=True) and reason in speed.skipped["cuda_graphs"]
    speed = Speedups(cuda_graphs=True)
    assert not training_callbacks(speed, "lora", cuda=True) and "fused" in speed.skipped["cuda_graphs"]
    speed = Speedups(fused_lora=True, cuda_graphs=True)
    assert [type(c).__name__ for c in training_callbacks(speed, "lora", cuda=False)] == ["SwitchCallback"]
    assert speed.skipped["cuda_graphs"] == "needs a CUDA GPU"
    assert graphs_wanted(Speedups(fused_lora=True, cuda_graphs=True), "lora", cuda=True)


def test_the_row_collator_keeps_packed_examples_as_rows_of_max_seq_len():
    from tools.finetune.row_packing import row_collator

    collate = row_collator(pad_token_id=0, max_seq_len=8, fixed_length=True)
    out = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "seq_lengths": [2, 3]},
                   {"input_ids": [3, 4, 5], "labels": [3, 4, 5], "seq_lengths": [3]}])
    assert set(out) == {"input_ids", "labels", "position_ids"}                 # no mask: the model builds one
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 5, 0, 0, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, -100, 8, 9, -100, -100, -100],
                                      [-100, 4, 5, -100, -100, -100, -100, -100]]
    plain = row_collator(pad_token_id=0, max_seq_len=4, fixed_length=True)(
        [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert plain["position_ids"].tolist() == [[0, 1, 2, 0]] and plain["labels"].tolist() == [[-100, 2, 3, -100]]
    # without fixed_length (packing without graphs) a batch is as long as its longest row, not max_seq_len
    short = row_collator(pad_token_id=0, max_seq_len=4096)(
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]},
         {"input_ids": [3, 4], "labels": [3, 4], "seq_lengths": [2]}])
    assert short["input_ids"].shape == (2, 5) and short["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 0, 0]]
