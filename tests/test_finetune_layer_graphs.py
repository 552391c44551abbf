"""The CUDA-graph plumbing of tools/finetune/layer_graphs.py on CPU: the graph step itself needs a GPU (it is
measured by evals/gpu/speed_bench.py variant fast_graphs), so here make_graphed_callables hands back the eager
callables it was given — what is checked is everything around it: each layer's inputs recorded from a real
forward, the layers replaced in order with the same loss and gradients, parameters and layer attributes still
reachable, and a batch the graphs were not captured for refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from runs import tiny_lora_model  # noqa: E402

from tools.finetune import layer_graphs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tools.finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-graphs"))


def batch(length: int = 24):
    ids = torch.randint(5, 200, (2, length), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model, inputs):
    loss = model(**inputs).loss
    loss.backward()
    grads = {n.replace(".inner", ""): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def test_the_layers_are_replaced_in_order_with_the_same_step(tiny, monkeypatch):
    captured = {}

    def eager(callables, samples, **kwargs):           # a GPU would capture here; the CPU replays eagerly
        captured["samples"] = samples
        return callables

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", eager)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    model = tiny_lora_model(tiny).train()
    model.config.use_cache = False
    ref_loss, ref_grads = loss_and_grads(model, batch())
    layers = layer_graphs.decoder_layers(model)
    originals = list(layers)
    assert layer_graphs.capture(model, batch()) == len(originals) > 1
    assert [layer.inner for layer in layers] == originals                 # replaced in place, in order
    samples = captured["samples"]
    assert len(samples) == len(originals)
    assert not samples[0][0].requires_grad and all(s[0].requires_grad for s in samples[1:])  # as in training
    assert tuple(samples[0][0].shape) == (2, 24, model.config.hidden_size)
    assert layers[0].self_attn is originals[0].self_attn                  # attributes read through
    loss, grads = loss_and_grads(model, batch())
    assert loss == pytest.approx(ref_loss, rel=1e-6) and grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-5, atol=1e-7), name
    with pytest.raises(RuntimeError, match="captured for"):
        model(**batch(length=16))


def test_it_says_why_it_cannot_graph(tiny):
    model = tiny_lora_model(tiny)
    if not torch.cuda.is_available():
        assert layer_graphs.why_not(model, lora_dropout=0.0) == "CUDA graphs need a GPU"
    else:
        assert "seed" in layer_graphs.why_not(model, lora_dropout=0.05)
    assert layer_graphs.decoder_layers(torch.nn.Linear(2, 2)) is None
