"""Tiny random-init models of 39 architectures peft users fine-tune, built from transformers configs (no hub), with
a batch each and a way to read the logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as tf

D, FF, V, L = 32, 64, 99, 2
DEC = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Arch:
    name: str
    build: object  # () -> model
    kind: str  # causal | seq_cls | token_cls | qa | seq2seq | speech | image
    task_type: str | None
    # False where the model feeds a Linear a transposed (non-contiguous) input: on some CPUs (AMD EPYC, torch
    # 2.13) F.linear's bits then depend on where the input's buffer lies (48 of 64 storage offsets gave other bits
    # for the same values), so the base model itself is reproducible only to rounding across allocations
    exact: bool = True


def _cfg(cls, **kw):
    return cls(**kw)


def archs() -> list[Arch]:
    out = [
        Arch("llama", lambda: tf.LlamaForCausalLM(_cfg(tf.LlamaConfig, **DEC)), "causal", "CAUSAL_LM"),
        Arch("qwen2", lambda: tf.Qwen2ForCausalLM(_cfg(tf.Qwen2Config, **DEC)), "causal", "CAUSAL_LM"),
        Arch("qwen3", lambda: tf.Qwen3ForCausalLM(_cfg(tf.Qwen3Config, head_dim=8, **DEC)), "causal", "CAUSAL_LM"),
        Arch("mistral", lambda: tf.MistralForCausalLM(_cfg(tf.MistralConfig, **DEC)), "causal", "CAUSAL_LM"),
        Arch("gemma", lambda: tf.GemmaForCausalLM(_cfg(tf.GemmaConfig, head_dim=8, **DEC)), "causal", "CAUSAL_LM"),
        Arch("gemma2", lambda: tf.Gemma2ForCausalLM(_cfg(tf.Gemma2Config, head_dim=8, **DEC)), "causal",
             "CAUSAL_LM"),
        Arch("gemma3", lambda: tf.Gemma3ForCausalLM(_cfg(tf.Gemma3TextConfig, head_dim=8, **DEC)), "causal",
             "CAUSAL_LM"),
        Arch("phi3", lambda: tf.Phi3ForCausalLM(_cfg(tf.Phi3Config, **DEC)), "causal", "CAUSAL_LM"),
        Arch("gpt2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4,
                                                              n_positions=64)), "causal", "CAUSAL_LM"),
        Arch("gpt_neox", lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=4,
            max_position_embeddings=64)), "causal", "CAUSAL_LM"),
        Arch("opt", lambda: tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=V, hidden_size=D, ffn_dim=FF, num_hidden_layers=L, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=D)), "causal", "CAUSAL_LM"),
        Arch("falcon", lambda: tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4)), "causal", "CAUSAL_LM"),
        Arch("mixtral", lambda: tf.MixtralForCausalLM(_cfg(tf.MixtralConfig, num_local_experts=4,
                                                           num_experts_per_tok=2, **DEC)), "causal", "CAUSAL_LM"),
        Arch("qwen3_moe", lambda: tf.Qwen3MoeForCausalLM(_cfg(
            tf.Qwen3MoeConfig, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            decoder_sparse_step=1, **DEC)), "causal", "CAUSAL_LM"),
        Arch("qwen2_moe", lambda: tf.Qwen2MoeForCausalLM(_cfg(
            tf.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, **DEC)), "causal", "CAUSAL_LM"),
        Arch("olmoe", lambda: tf.OlmoeForCausalLM(_cfg(tf.OlmoeConfig, num_experts=4, num_experts_per_tok=2, **DEC)),
             "causal", "CAUSAL_LM"),
        Arch("stablelm", lambda: tf.StableLmForCausalLM(_cfg(tf.StableLmConfig, **DEC)), "causal", "CAUSAL_LM"),
        Arch("phi", lambda: tf.PhiForCausalLM(_cfg(tf.PhiConfig, **DEC)), "causal", "CAUSAL_LM"),
        Arch("bloom", lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=D, n_layer=L, n_head=4)),
             "causal", "CAUSAL_LM"),
        Arch("gptj", lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=V, n_embd=D, n_layer=L, n_head=4,
                                                              n_positions=64, rotary_dim=4)), "causal", "CAUSAL_LM"),
        Arch("codegen", lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(
            vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64, n_ctx=64, rotary_dim=4)), "causal",
            "CAUSAL_LM"),
        Arch("bert", lambda: tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
            max_position_embeddings=64)), "seq_cls", "SEQ_CLS"),
        Arch("roberta", lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
            max_position_embeddings=70, pad_token_id=1)), "seq_cls", "SEQ_CLS"),
        Arch("deberta_v2", lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
            max_position_embeddings=64)), "seq_cls", "SEQ_CLS"),
        Arch("distilbert", lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=V, dim=D, n_layers=L, n_heads=4, hidden_dim=FF, max_position_embeddings=64)), "seq_cls",
            "SEQ_CLS"),
        Arch("electra", lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(
            vocab_size=V, embedding_size=16, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
            intermediate_size=FF, max_position_embeddings=64)), "seq_cls", "SEQ_CLS"),
        Arch("modernbert", lambda: tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
            sep_token_id=2)), "seq_cls", "SEQ_CLS"),
        Arch("xlm_roberta", lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
            max_position_embeddings=70, pad_token_id=1)), "seq_cls", "SEQ_CLS"),
        Arch("albert", lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(
            vocab_size=V, embedding_size=16, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
            intermediate_size=FF, max_position_embeddings=64)), "seq_cls", "SEQ_CLS"),
        Arch("mpnet", lambda: tf.MPNetForSequenceClassification(tf.MPNetConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF,
            max_position_embeddings=70, pad_token_id=1)), "seq_cls", "SEQ_CLS"),
        Arch("t5", lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=V, d_model=D, d_kv=8, d_ff=FF, num_layers=L, num_heads=4, decoder_start_token_id=0)),
            "seq2seq", "SEQ_2_SEQ_LM"),
        Arch("bart", lambda: tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=FF, decoder_ffn_dim=FF, max_position_embeddings=64)),
            "seq2seq", "SEQ_2_SEQ_LM"),
        Arch("mbart", lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(
            vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=FF, decoder_ffn_dim=FF, max_position_embeddings=64)),
            "seq2seq", "SEQ_2_SEQ_LM"),
        Arch("marian", lambda: tf.MarianMTModel(tf.MarianConfig(
            vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=FF, decoder_ffn_dim=FF, max_position_embeddings=64,
            pad_token_id=0, decoder_start_token_id=0)), "seq2seq", "SEQ_2_SEQ_LM"),
        Arch("whisper", lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=FF, decoder_ffn_dim=FF, num_mel_bins=8,
            max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)), "speech", None),
        Arch("vit", lambda: tf.ViTForImageClassification(tf.ViTConfig(
            hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=FF, image_size=16,
            patch_size=8, num_channels=3, num_labels=3)), "image", None),
        Arch("convnext", lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
            num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=16, num_labels=3)),
            "image", None),
        Arch("swin", lambda: tf.SwinForImageClassification(tf.SwinConfig(
            image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4,
            num_labels=3)), "image", None),
        Arch("resnet", lambda: tf.ResNetForImageClassification(tf.ResNetConfig(  # BatchNorm: trained densely
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), "image", None),
    ]
    return out


def inputs(arch: Arch, batch: int = 2, seq: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if arch.kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2])[:batch]}
    ids = torch.randint(3, V, (batch, seq), generator=g)
    if arch.kind == "causal":
        return {"input_ids": ids, "labels": ids}
    if arch.kind == "seq_cls":
        return {"input_ids": ids, "labels": torch.tensor([0, 1])[:batch]}
    if arch.kind == "token_cls":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch, seq), generator=g)}
    if arch.kind == "qa":
        return {"input_ids": ids, "start_positions": torch.tensor([1, 2])[:batch],
                "end_positions": torch.tensor([3, 4])[:batch]}
    if arch.kind == "speech":
        return {"input_features": torch.randn(batch, 8, 32, generator=g), "labels": ids}
    return {"input_ids": ids, "labels": ids}  # seq2seq


def output(model, batch: dict) -> torch.Tensor:
    out = model(**batch)
    if getattr(out, "logits", None) is None:  # question answering
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits
