"""Tiny quantized Llamas for the quantized-base tests: one per supported layer kind and backend, each next to a
float twin whose Linear weights are the dequantized ones."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

bnb = pytest.importorskip("bitsandbytes")
torchao = pytest.importorskip("torchao")

# kind -> BitsAndBytesConfig arguments (None: torchao int8 weight-only)
KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4_double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
    "torchao_int8": None,
}
VOCAB = 128


def llama_config(**overrides) -> LlamaConfig:
    """hidden 64, 2 layers, 4 query / 2 key-value heads, biases on the attention projections, untied embeddings
    (bitsandbytes' CPU kernels want multiples of 32)."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=2, eos_token_id=2, attention_bias=True)
    return LlamaConfig(**{**fields, **overrides})


def save_float_llama(path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config()).save_pretrained(path)


def load_quantized(path, kind: str, **kwargs) -> LlamaForCausalLM:
    """The saved Llama loaded with `kind`'s quantization (its Linear layers, lm_head aside)."""
    from transformers import BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if KINDS[kind] is not None:
            return LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**KINDS[kind]),
                                                    **kwargs)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = LlamaForCausalLM.from_pretrained(path, **kwargs)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Linear)
                  and "lm_head" not in name)
        return model


def dequantized_twin(path, quantized: LlamaForCausalLM) -> LlamaForCausalLM:
    """The float model whose quantized Linear weights are replaced by their dequantized values."""
    from sam_peft.tuner.quantized_layers import quantized_kind

    twin = LlamaForCausalLM.from_pretrained(path)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            source = modules.get(f"{name}.base_layer", modules.get(name))  # wrapped or not
            kind = None if source is None else quantized_kind(source)
            if isinstance(module, torch.nn.Linear) and kind is not None:
                module.weight.copy_(kind.dequantize(source).float())
    return twin


def batches(n: int, seed: int = 1, batch: int = 4, seq: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out
