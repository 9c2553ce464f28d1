"""Architectures and configurations outside the matrix of tests/test_architectures.py (issue 22): the lifecycle of
that file on models that exercise a particular corner, and the rules behind each fix.

- Longformer divides a projection's output in place: the custom autograd Functions (float and quantized) never
  return a view.
- TOKEN_CLS and QUESTION_ANS heads are trained densely (`modules_to_save`) by default, as SEQ_CLS heads are.
- BatchNorm's running statistics: the burn-in restores them, and such layers are trained densely (modules_to_save),
  never tuned sparsely.
- RecurrentGemma sets state on its (wrapped) layers at run time: writes reach the wrapped module.
- ProphetNet calls a method of a wrapped layer (`position_embeddings._forward`): it runs with the delta too.
- RecurrentGemma's decoding reads its conv's weight directly: on the generic path the read gives θ0 + Δ.
- A bf16 GPT-2 with non-zero biases: transformers' Conv1D rounds once (`addmm`), and so does its wrapper.
- Parameters no targetable module owns alone (XLNet's relative attention, Mamba's `A_log`, CLIP's `logit_scale`)
  stay frozen, and one warning lists them.
"""

from __future__ import annotations

import logging

import pytest
import test_architectures as matrix
import torch
import transformers as tf
from architectures import FF, Arch, D, L, V
from peft import get_peft_model
from torch import nn

import sam_peft
from sam_peft.tuner.layer import SparseDiffLayer
from sam_peft.tuner.ops import not_a_view


# --------------------------------------------------------------------------- 1. no views out of custom Functions
def test_longformer_lifecycle(tmp_path):
    """Longformer's global attention divides the query projection's output in place (`/= sqrt(head_dim)`)."""
    arch = Arch("longformer", lambda: tf.LongformerForSequenceClassification(tf.LongformerConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
        max_position_embeddings=70, attention_window=[4] * L, pad_token_id=1)), "seq_cls", "SEQ_CLS", exact=False)
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


# --------------------------------------------------------------------------- 2. task heads of TOKEN_CLS, QUESTION_ANS
ENCODER = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
               max_position_embeddings=70)
HEADS = [
    Arch("bert_token_cls", lambda: tf.BertForTokenClassification(tf.BertConfig(**ENCODER)), "token_cls",
         "TOKEN_CLS"),
    Arch("roberta_qa", lambda: tf.RobertaForQuestionAnswering(tf.RobertaConfig(pad_token_id=1, **ENCODER)), "qa",
         "QUESTION_ANS"),
]


@pytest.mark.parametrize("arch", HEADS, ids=lambda a: a.name)
def test_task_head_lifecycle(arch, tmp_path):
    matrix.test_lifecycle(arch, tmp_path)


@pytest.mark.parametrize(("arch", "head"), zip(HEADS, ["classifier", "qa_outputs"]),
                         ids=lambda a: getattr(a, "name", a))
def test_task_head_trained_densely(arch, head):
    model = get_peft_model(arch.build(), sam_peft.SAMConfig(task_type=arch.task_type))
    assert head in model.peft_config["default"].modules_to_save
    wrapped = model.base_model.model.get_submodule(head)
    assert not any(isinstance(m, SparseDiffLayer) for m in wrapped.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and f"{head}.modules_to_save" in n]
    assert trainable, "the head is not trained"


def test_task_head_targeted_explicitly_is_refused():
    with pytest.raises(sam_peft.ConfigError, match="qa_outputs"):
        get_peft_model(HEADS[1].build(), sam_peft.SAMConfig(task_type="QUESTION_ANS", target_modules=["qa_outputs"]))


# --------------------------------------------------------------------------- 3. running statistics (BatchNorm)
RESNET = Arch("resnet", lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
    num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), "image", None)


def test_batchnorm_lifecycle(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        matrix.test_lifecycle(RESNET, tmp_path)
    assert "running statistics" in caplog.text and "resnet.embedder.embedder.normalization" in caplog.text


def test_batchnorm_trained_densely():
    model = get_peft_model(RESNET.build(), sam_peft.SAMConfig())
    norms = [n for n, m in model.base_model.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    saved = model.peft_config["default"].modules_to_save
    assert "resnet.embedder.embedder.normalization" in saved
    assert not any(isinstance(m, SparseDiffLayer) and isinstance(m.get_base_layer(), nn.BatchNorm2d)
                   for m in model.modules())


def test_burn_in_restores_running_statistics():
    """The burn-in runs in train mode (dropout on): BatchNorm layers, here left frozen, update their statistics,
    which the selection then puts back."""
    torch.manual_seed(0)
    base = RESNET.build().eval()
    batches = [matrix.inputs(RESNET, seed=s) for s in range(2)]
    model = get_peft_model(base, sam_peft.SAMConfig(sparsity=0.05, exclude_modules=r".*normalization"))
    model.eval()
    before = {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}
    assert len(before) == 3 * 8
    with torch.no_grad():
        reference = matrix.output(model, batches[0])
    sam_peft.select_parameters(model, batches, progress=False)
    after = dict(model.named_buffers())
    assert all(torch.equal(after[n], b) for n, b in before.items()), "the burn-in moved running statistics"
    with torch.no_grad():
        assert torch.equal(matrix.output(model, batches[0]), reference)


def test_batchnorm_targeted_explicitly_is_refused():
    with pytest.raises(sam_peft.ConfigError, match="running statistics.*embedder.normalization"):
        get_peft_model(RESNET.build(), sam_peft.SAMConfig(target_modules=r".*embedder\.normalization"))


# --------------------------------------------------------------------------- 4. writes reach the wrapped module
def test_setattr_reaches_the_wrapped_module():
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.state = None

        def forward(self, x):
            out = x * self.scale + (0 if self.state is None else self.state)
            self.state = out.detach()
            return out

    class WithDefault(Stateful):
        cache = None  # a class-level default, set on the instance at run time

    holder = nn.Sequential(WithDefault())
    model = get_peft_model(holder, sam_peft.SparseDiffConfig(sparsity=0.5, selection="random"))
    layer = model.base_model.model[0]
    assert isinstance(layer, SparseDiffLayer)
    base = layer.get_base_layer()
    layer.state = torch.full((3,), 5.0)  # as a model resets its layers' state
    assert "state" not in layer.__dict__ and torch.equal(base.state, torch.full((3,), 5.0))
    model(torch.zeros(3))
    assert torch.equal(layer.state, base.state)
    layer.cache = 3
    assert "cache" not in layer.__dict__ and base.cache == 3
    layer.module_key = layer.module_key  # the wrapper's own attributes stay its own
    layer.extra = 1  # a new attribute belongs to the wrapper
    assert "extra" in layer.__dict__ and not hasattr(base, "extra")
    del layer.state
    assert not hasattr(base, "state")
    layer.new_buffer = None
    layer.register_buffer("buf", torch.zeros(1))
    layer.buf = torch.ones(1)  # a buffer of the wrapper stays the wrapper's
    assert torch.equal(layer._buffers["buf"], torch.ones(1))
    layer.scale = nn.Parameter(torch.full((3,), 2.0))  # a parameter of the wrapped module is replaced there
    assert "scale" not in layer._parameters and torch.equal(base.scale, torch.full((3,), 2.0))


def test_recurrent_gemma_batch_size_change():
    """RecurrentGemma re-initialises `rg_lru.recurrent_states` from its parent block when the batch size changes; on
    the wrapper only, the wrapped layer kept the old batch's state and the next call failed."""
    torch.manual_seed(0)
    base = tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, lru_width=D, attention_window_size=8, pad_token_id=0)).eval()
    reference = {}
    with torch.no_grad():
        for batch in (2, 3, 1):
            ids = torch.randint(3, V, (batch, 6), generator=torch.Generator().manual_seed(batch))
            reference[batch] = (ids, base(input_ids=ids).logits)
    logging.disable(logging.WARNING)
    try:
        model = get_peft_model(base, sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.05)).eval()
    finally:
        logging.disable(logging.NOTSET)
    with torch.no_grad():
        for ids, logits in reference.values():
            torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- methods of the wrapped module
def test_prophetnet_lifecycle(tmp_path):
    """ProphetNet's decoder reads its position embeddings through `forward` and through `_forward`; with `_forward`
    on θ0 the merged model gave other numbers than the adapted one."""
    arch = Arch("prophetnet", lambda: tf.ProphetNetForConditionalGeneration(tf.ProphetNetConfig(
        vocab_size=V, hidden_size=D, encoder_ffn_dim=FF, decoder_ffn_dim=FF, num_encoder_layers=L,
        num_decoder_layers=L, num_encoder_attention_heads=4, num_decoder_attention_heads=4, max_position_embeddings=64,
        ngram=2)), "seq2seq", "SEQ_2_SEQ_LM")
    matrix.test_lifecycle(arch, tmp_path)


def test_methods_of_the_wrapped_module_see_the_delta():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids + 1)

        def unshifted(self, ids):
            return super().forward(ids)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Shifted(10, 4)

        def forward(self, ids):
            return self.embed(ids) + self.embed.unshifted(ids)

    torch.manual_seed(0)
    model = get_peft_model(Holder(), sam_peft.SparseDiffConfig(sparsity=0.5, selection="random", init_weights=False))
    layer = model.base_model.model.embed
    ids = torch.tensor([[0, 3, 5]])
    out = model(ids)
    out.sum().backward()
    weight = layer.get_base_layer().weight.detach() + layer.get_delta_weight("default")
    torch.testing.assert_close(out, weight[ids + 1] + weight[ids])
    assert layer.unshifted.__name__ == "unshifted"
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(ids), out.detach())


def test_direct_reads_of_a_generic_layer_see_the_delta():
    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, groups=4, padding=2)

        def forward(self, x):  # x: (batch, 4, length); the last step as a decoding step computes it
            return (x[:, :, -3:] * self.conv.weight[:, 0, :]).sum(-1) + self.conv.bias

    torch.manual_seed(0)
    model = get_peft_model(Reader(), sam_peft.SparseDiffConfig(sparsity=0.5, selection="random", init_weights=False))
    layer = model.base_model.model.conv
    x = torch.randn(2, 4, 5)
    out = model(x)
    out.sum().backward()
    assert layer.sparsediff_values["default"]["weight"].grad.abs().sum() > 0
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(layer.weight, layer.get_base_layer().weight)
    assert not torch.equal(layer.weight, layer.get_base_layer().weight)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), out.detach())
    replacement = nn.Parameter(torch.zeros(4, 1, 3))
    fresh = get_peft_model(Reader(), sam_peft.SparseDiffConfig(sparsity=0.5, selection="random"))
    fresh.base_model.model.conv.weight = replacement  # a write of `weight` goes to the wrapped module
    assert fresh.base_model.model.conv.get_base_layer().weight is replacement


def test_recurrent_gemma_decoding_matches_merged():
    """RecurrentGemma's decoding step multiplies by `conv_1d.weight` directly: with θ0 there, generation by the
    adapted model and by the merged one differed after the first token."""
    torch.manual_seed(0)
    arch = Arch("recurrent_gemma", lambda: tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, lru_width=D, attention_window_size=8, pad_token_id=0)), "causal", "CAUSAL_LM")
    batches = [matrix.inputs(arch, seed=s) for s in range(2)]
    logging.disable(logging.WARNING)
    try:
        model = get_peft_model(arch.build().eval(), sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.2))
    finally:
        logging.disable(logging.NOTSET)
    model.train()
    model.base_model.model.eval()
    sam_peft.select_parameters(model, batches, progress=False)
    matrix._train(model, batches, steps=4)

    def scores(m):
        with torch.no_grad():
            return m.generate(input_ids=batches[0]["input_ids"], max_new_tokens=3, do_sample=False,
                              output_scores=True, return_dict_in_generate=True).scores

    adapted = scores(model)
    merged = scores(model.merge_and_unload().eval())
    for a, b in zip(adapted, merged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bf16 bases
@pytest.mark.parametrize("name", ["gpt2", "opt", "bert", "t5"])
def test_bf16_base_with_biases_lifecycle(name, tmp_path, monkeypatch):
    """The lifecycle on a bf16 copy of a matrix model whose biases are not zero (a trained checkpoint's are not):
    Conv1D computed x W + b in two roundings where transformers' Conv1D uses one `addmm`, so wrapping a bf16 GPT-2
    changed its output by one bf16 ulp."""
    arch = next(a for a in matrix.ARCHS if a.name == name)

    def build():
        model = arch.build()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
        return model.to(torch.bfloat16)

    monkeypatch.setattr(matrix, "_base", lambda _: (torch.manual_seed(0), build().eval())[1])
    matrix.test_lifecycle(arch, tmp_path)


# --------------------------------------------------------------------------- 5. frozen parameters are named
def _frozen_warning(model, caplog) -> str:
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        get_peft_model(model, sam_peft.SAMConfig())
    found = [r.getMessage() for r in caplog.records if "stay frozen" in r.getMessage()]
    assert len(found) == 1, "one warning lists them all"
    return found[0]


def test_warning_names_parameters_owned_by_containers(caplog):
    torch.manual_seed(0)
    model = tf.XLNetLMHeadModel(tf.XLNetConfig(vocab_size=V, d_model=D, n_layer=L, n_head=4, d_inner=FF))
    message = _frozen_warning(model, caplog)
    for name in ("transformer.layer.0.rel_attn.r_w_bias", "transformer.layer.1.rel_attn.q", "transformer.mask_emb"):
        assert f"'{name}'" in message


def test_warning_names_parameters_owned_by_the_model(caplog):
    torch.manual_seed(0)
    model = tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8), projection_dim=16))
    message = _frozen_warning(model, caplog)
    assert "'logit_scale'" in message and "'vision_model.embeddings.class_embedding'" in message


def test_no_warning_when_everything_is_tunable(caplog):
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), sam_peft.SAMConfig())
    assert "stay frozen" not in caplog.text


@pytest.mark.parametrize("kind", ["torchao_int8", "nf4"])
def test_in_place_ops_on_quantized_layer_outputs(kind, tmp_path):
    """The quantized layers' Function returns no view either (a model changing a projection's output in place)."""
    quantized_models = pytest.importorskip("quantized_models")
    quantized_models.save_float_llama(tmp_path)
    base = quantized_models.load_quantized(tmp_path, kind)
    model = get_peft_model(base, sam_peft.SparseDiffConfig(task_type="CAUSAL_LM", sparsity=0.05, selection="random",
                                                          init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "QuantizedLinear"

    def halve(module, args, out):
        out.mul_(0.5)  # in place, returns nothing

    layer.register_forward_hook(halve)
    model.train()
    model(**quantized_models.batches(1)[0]).loss.backward()
    assert layer.sparsediff_values["default"]["weight"].grad is not None
