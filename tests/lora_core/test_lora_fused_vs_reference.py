"""The fast path (lora_core.fused) computes what the reference forward (LoraLinear's formula)
computes, outputs and gradients, under one dropout mask; the switch decides which one runs."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_lora_layers import linear, llama_with_lora, randomize_b
from torch import nn

from lora_core import adapter_parameters, fused, use_fused
from lora_core.fused import SiblingGroup, keep_mask
from lora_core.inject import lora_layers
from lora_core.layers import LoraLinear

REPO = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
GROUPS_PER_LLAMA = 2 * 4  # per decoder layer: q/k/v, o, gate/up, down


class ReplayDropout(nn.Module):
    """Dropout with the mask the fast path draws: `keep_mask` from the global generator, once per
    input tensor; the same tensor passed again (a sibling's call) gets the same mask back, as a
    sibling group shares one. Given to the reference path as `lora_dropout`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._last: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self._last is None or self._last[0]() is not x:
            self._last = (weakref.ref(x), *keep_mask(x.shape, self.p))
        _, keep, scale = self._last
        return x * keep * scale


def fast_path_nodes(*outputs: torch.Tensor) -> int:
    """The number of fast-path autograd nodes in the graph that produced `outputs`."""
    seen, stack = set(), [o.grad_fn for o in outputs]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack += [next_fn for next_fn, _ in fn.next_functions]
    return sum(type(fn).__name__ == "_LoraGroupBackward" for fn in seen)


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def test_the_paths_agree_on_a_model_in_outputs_and_gradients_under_one_dropout_mask():
    """All seven projections, q/k/v and gate/up as sibling groups, dropout 0.3, float64."""
    model = llama_with_lora(0.3).double().train()
    replay = ReplayDropout(0.3)
    for layer in lora_layers(model).values():
        layer.lora_dropout = replay
    embeds = model.get_input_embeddings()(IDS).detach()
    weights = torch.randn(2, 16, 96, dtype=torch.float64)

    def run(fast: bool, seed: int = 5):
        model.zero_grad()
        x = embeds.clone().requires_grad_(True)
        torch.manual_seed(seed)
        with use_fused(fast):
            out = model(inputs_embeds=x).logits
        nodes = fast_path_nodes(out)
        (out * weights).sum().backward()
        return nodes, out.detach(), x.grad, {n: p.grad.clone() for n, p in adapter_parameters(model).items()}

    (fast_nodes, *fast), (ref_nodes, *ref) = run(True), run(False)
    assert fast_nodes == GROUPS_PER_LLAMA and ref_nodes == 0
    torch.testing.assert_close(fast[0], ref[0])  # logits
    torch.testing.assert_close(fast[1], ref[1])  # the input's gradient
    assert fast[2].keys() == ref[2].keys() and len(ref[2]) == 2 * 7 * 2
    for name in ref[2]:
        torch.testing.assert_close(fast[2][name], ref[2][name], msg=name)
    other_mask = run(False, seed=6)
    assert not torch.allclose(other_mask[1], ref[0], rtol=1e-3)  # the comparison tells masks apart


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_the_paths_agree_on_one_layer_in_outputs_and_gradients_under_one_dropout_mask(kind, base_dtype):
    layer = LoraLinear(linear(kind, dtype=base_dtype), r=4, alpha=8, dropout=0.3, lora_bias=True).train()
    randomize_b(layer)
    layer.lora_dropout = ReplayDropout(0.3)
    x0, g = torch.randn(3, 5, 12, dtype=base_dtype), torch.randn(3, 5, 20, dtype=base_dtype)

    def run(fast: bool):
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(5)
        with use_fused(fast):
            out = layer(x)
        nodes = fast_path_nodes(out)
        out.backward(g)
        return nodes, out, x.grad, *(p.grad for p in layer.adapter_params().values())

    (fast_nodes, *fast), (ref_nodes, *ref) = run(True), run(False)
    assert fast_nodes == 1 and ref_nodes == 0
    assert [t.dtype for t in fast] == [t.dtype for t in ref] == [base_dtype] * 2 + [torch.float32] * 3
    for ours, want in zip(fast, ref, strict=True):
        # dropout scales h on one path and x on the other: equal up to rounding; bf16: one bf16 step
        tol = 2e-2 if want.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(ours, want, rtol=tol, atol=tol * want.abs().max().item())


def test_the_switch_turns_the_fast_path_off_process_wide_and_back():
    model = llama_with_lora(0.1).train()
    before = fused.enabled()
    with use_fused(True):
        assert fast_path_nodes(logits(model)) == GROUPS_PER_LLAMA
        with use_fused(False):
            assert not fused.enabled() and fast_path_nodes(logits(model)) == 0
        assert fused.enabled() and fast_path_nodes(logits(model)) == GROUPS_PER_LLAMA
        fused.set_enabled(False)
        assert fast_path_nodes(logits(model)) == 0
    assert fused.enabled() == before  # use_fused restores what it found, whatever ran inside


def test_the_switch_turns_the_fast_path_off_for_one_model_only():
    a, b = llama_with_lora(0.1).train(), llama_with_lora(0.1).train()
    with use_fused(True):
        with use_fused(False, a):
            assert fast_path_nodes(logits(a)) == 0 and fast_path_nodes(logits(b)) == GROUPS_PER_LLAMA
        assert fast_path_nodes(logits(a)) == GROUPS_PER_LLAMA
        fused.set_enabled(False, b)
        assert fast_path_nodes(logits(b)) == 0 and fast_path_nodes(logits(a)) == GROUPS_PER_LLAMA


def test_a_sibling_switched_off_runs_the_reference_and_its_siblings_still_compute_theirs():
    attn = llama_with_lora(0.0).model.layers[0].self_attn
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(2, 5, 32, requires_grad=True)
    with use_fused(False):
        want = [p(x) for p in projections]
    attn.k_proj.fast_path = False
    with use_fused(True):
        got = [p(x) for p in projections]
    assert [fast_path_nodes(o) for o in got] == [1, 0, 1]
    for ours, ref in zip(got, want):
        torch.testing.assert_close(ours, ref)


def test_under_autocast_the_reference_runs_in_autocast_dtype_and_trains():
    torch.manual_seed(0)
    layers = [LoraLinear(nn.Linear(5, out), r=2, alpha=3.0, dropout=0.2, lora_bias=True).train() for out in (4, 3)]
    group, replay = SiblingGroup(layers), ReplayDropout(0.2)
    for la in layers:
        randomize_b(la)
        la.siblings, la.lora_dropout = group, replay
    x = torch.randn(6, 5, requires_grad=True)
    torch.manual_seed(7)
    with use_fused(True), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [la(x) for la in layers]
    assert fast_path_nodes(*outs) == 0
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.2)
    for out, la in zip(outs, layers):
        assert la.lora_A.weight.grad is not None and la.lora_B.weight.grad.abs().sum() > 0
        want = (F.linear(x, la.base_layer.weight, la.base_layer.bias)
                + la.scaling * (F.linear(F.linear(x * keep * scale, la.lora_A.weight), la.lora_B.weight) + la.lora_B.bias))
        torch.testing.assert_close(out.float(), want.detach(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("true", True), ("", True),
                                      ("0", False), ("off", False), (" No ", False)])
def test_the_environment_variable_reads_as_on_or_off(value, on):
    assert fused._env_switch(value) is on


def test_an_unknown_environment_value_is_refused():
    with pytest.raises(ValueError, match="LORAFLOW_FUSED_LORA='maybe'"):
        fused._env_switch("maybe")


def test_the_environment_variable_switches_the_fast_path_off_in_a_new_process():
    script = ("import torch\nfrom lora_core import fused\nfrom lora_core.layers import LoraLinear\n"
              "print(fused.enabled(), fused.applies(LoraLinear(torch.nn.Linear(4, 4), 2, 2), torch.randn(3, 4)))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LORAFLOW_FUSED_LORA": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"]
