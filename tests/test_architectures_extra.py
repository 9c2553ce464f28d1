"""Architectures and configurations outside the matrix of tests/test_architectures.py (issue 22): the lifecycle of
that file on models that exercise a particular corner, and the rules behind each fix.

- Longformer divides a projection's output in place: the custom autograd Functions never return a view.
"""

from __future__ import annotations

import pytest
import test_architectures as matrix
import torch
import transformers as tf
from architectures import FF, Arch, D, L, V
from peft import get_peft_model
from torch import nn

import sam_peft
from sam_peft.tuner.ops import not_a_view


# --------------------------------------------------------------------------- 1. no views out of custom Functions
def test_longformer_lifecycle(tmp_path):
    """Longformer's global attention divides the query projection's output in place (`/= sqrt(head_dim)`)."""
    arch = Arch("longformer", lambda: tf.LongformerForSequenceClassification(tf.LongformerConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
        max_position_embeddings=70, attention_window=[4] * L, pad_token_id=1)), "seq_cls", "SEQ_CLS")
    matrix.test_lifecycle(arch, tmp_path)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.conv1d = tf.pytorch_utils.Conv1D(8, 8)

    def forward(self, ids):
        h = self.embed(ids)
        h.mul_(2.0)  # in place on each layer's output, as Longformer does
        h = self.proj(h)
        h /= 3.0
        h = self.conv1d(h)
        h += 1.0
        return h


@pytest.mark.parametrize("adapters", [1, 2], ids=["written", "sparse_term"])
def test_in_place_ops_on_layer_outputs_train(adapters):
    """Every path (delta written in; two active adapters: separate sparse term) lets the model change a layer's
    output in place while training."""
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), sam_peft.SparseDiffConfig(sparsity=0.5, selection="random",
                                                              target_modules=["embed", "proj", "conv1d"]))
    if adapters == 2:
        model.add_adapter("other", sam_peft.SparseDiffConfig(sparsity=0.5, selection="random", seed=1,
                                                              target_modules=["embed", "proj", "conv1d"]))
        model.base_model.set_adapter(["default", "other"])
    ids = torch.randint(0, 20, (2, 5))
    model(ids).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


def test_not_a_view():
    base = torch.randn(4, 6)
    inside = base @ torch.randn(6, 6)
    view = inside.view(2, 2, 6)
    out = not_a_view(view, base)
    assert not out._is_view() and out.data_ptr() == view.data_ptr()  # no copy of a tensor made inside
    alias = not_a_view(base.view(2, 12), base)
    assert not alias._is_view() and alias.data_ptr() != base.data_ptr()  # an input's memory is copied
    assert torch.equal(alias.view(4, 6), base)
    fresh = base + 1
    assert not_a_view(fresh, base) is fresh
