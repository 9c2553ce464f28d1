"""peft's `adapter_names`: each row of a batch runs with its own sam-peft adapter (or the base), equal to running
that row alone with its adapter set; what cannot be split is refused, never ignored."""

from __future__ import annotations

import pytest
import torch
from architectures import archs, inputs, output
from peft import get_peft_model

import sam_peft
from sam_peft.tuner.targets import targets

ARCHS = {a.name: a for a in archs()}
NAMES = ["one", "two", "__base__", "two"]


# position tables fed indices shared by every row, not batch rows: a per-row delta cannot reach them
POSITION_TABLES = {"t5": ["relative_attention_bias"]}


def _two_adapters(arch, exclude=None):
    torch.manual_seed(0)
    exclude = POSITION_TABLES.get(arch.name) if exclude is None else exclude
    config = dict(task_type=arch.task_type, sparsity=0.05, selection="magnitude", exclude_modules=exclude or None)
    model = get_peft_model(arch.build().eval(), sam_peft.SAMConfig(**config), adapter_name="one")
    model.add_adapter("two", sam_peft.SAMConfig(**config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for scale, name in ((0.1, "one"), (0.2, "two")):
            for target in targets(model, name):
                target.values.copy_(scale * torch.randn(target.values.shape, generator=generator))
        for name, param in model.named_parameters():  # the heads peft trains densely: a distinct copy per adapter
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _alone(model, batch: dict, row: int, name: str) -> torch.Tensor:
    one = {k: v[row : row + 1] for k, v in batch.items()}
    if name == "__base__":
        with model.disable_adapter():
            return output(model, one)[0]
    model.set_adapter(name)
    return output(model, one)[0]


def _batch(arch, rows: int) -> dict:
    parts = [inputs(arch, batch=1, seed=s) for s in range(rows)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "distilbert", "t5"])
def test_each_row_equals_its_adapter_alone(name):
    arch = ARCHS[name]
    model = _two_adapters(arch)
    batch = _batch(arch, len(NAMES))
    with torch.no_grad():
        mixed = model(**batch, adapter_names=NAMES).logits
        rows = [_alone(model, batch, r, n) for r, n in enumerate(NAMES)]
    for r, n in enumerate(NAMES):
        torch.testing.assert_close(mixed[r], rows[r], rtol=1e-5, atol=1e-5, msg=f"row {r} ({n})")
    assert not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[1], rows[2]), "the adapters coincide"


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_generate_each_row_as_alone(name):
    arch = ARCHS[name]
    model = _two_adapters(arch)
    ids = _batch(arch, len(NAMES))["input_ids"]
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        for beams in (1, 2):
            mixed = model.generate(input_ids=ids, adapter_names=NAMES, num_beams=beams, **kwargs)
            for r, n in enumerate(NAMES):
                if n == "__base__":
                    with model.disable_adapter():
                        alone = model.generate(input_ids=ids[r : r + 1], num_beams=beams, **kwargs)
                else:
                    model.set_adapter(n)
                    alone = model.generate(input_ids=ids[r : r + 1], num_beams=beams, **kwargs)
                assert torch.equal(mixed[r, : alone.shape[1]], alone[0]), f"beams={beams}, row {r} ({n})"


def test_a_mixed_batch_leaves_the_active_adapter_alone():
    arch = ARCHS["llama"]
    model = _two_adapters(arch)
    batch = _batch(arch, 2)
    model.set_adapter("two")
    with torch.no_grad():
        before = output(model, batch)
        model(**batch, adapter_names=["one", "one"])
        after = output(model, batch)
    assert torch.equal(before, after)
    model.train()
    loss = model(**batch).loss  # the training path (its cached plan) still runs adapter two
    loss.backward()
    assert all(t.values.grad is None for t in targets(model, "one"))


def test_refusals():
    arch = ARCHS["llama"]
    model = _two_adapters(arch)
    batch = _batch(arch, 2)
    with pytest.raises(ValueError, match="holds"):
        model(**batch, adapter_names=["one", "typo"])
    with pytest.raises(ValueError, match="shape"):
        model(**batch, adapter_names=["one", "two", "one"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(**batch, adapter_names="one")
    with pytest.raises(ValueError, match="alora_offsets"):
        model(**batch, alora_offsets=[1, 1])
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(**batch, adapter_names=["one", "two"])
    model.eval()
    model.merge_adapter(["one"])
    with pytest.raises(ValueError, match="unmerge"):
        model(**batch, adapter_names=["one", "two"])


@pytest.mark.parametrize("name, module", [("t5", "block.0.layer.0.SelfAttention.relative_attention_bias")])
def test_position_tables_without_batch_rows_are_refused(name, module):
    model = _two_adapters(ARCHS[name], exclude=[])
    batch = _batch(ARCHS[name], 4)
    with pytest.raises(ValueError, match=module.replace(".", r"\.") + ".*position indices"):
        model(**batch, adapter_names=NAMES)


def test_a_head_peft_cannot_split_is_refused_by_peft():
    """RoBERTa's head is a module peft's modules_to_save wrapper does not split: peft's own clear error, as for LoRA."""
    model = _two_adapters(ARCHS["roberta"])
    with pytest.raises(TypeError, match="Mixed batching is only supported"):
        model(**_batch(ARCHS["roberta"], 4), adapter_names=NAMES)


def test_flattened_rows_are_refused_naming_the_module():
    """Mixtral's router sees (batch·tokens, hidden): its rows cannot be mapped to adapters, so it is an error."""
    model = _two_adapters(ARCHS["mixtral"])
    batch = _batch(ARCHS["mixtral"], 2)
    with pytest.raises(ValueError, match=r"mlp\.gate .*flattened tokens"):
        model(**batch, adapter_names=["one", "two"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_linear_layers_add_each_adapters_term_to_its_rows(name, monkeypatch):
    """Linear / Conv1D layers run one matmul for the batch and add each adapter's delta as a sparse term to its
    rows; small groups take that path, and a group whose term would outgrow the weight runs its own forward."""
    from sam_peft.tuner.weight_layers import SparseDiffLinear

    arch = ARCHS[name]
    model = _two_adapters(arch)
    taken = []
    by_terms = SparseDiffLinear.forward_rows_by_terms

    def spy(self, *args):
        out = by_terms(self, *args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(SparseDiffLinear, "forward_rows_by_terms", spy)
    for rows in (len(NAMES), 48):  # 48 rows × k at p = 0.05 outgrow the weight
        names = [NAMES[r % len(NAMES)] for r in range(rows)]
        batch = _batch(arch, rows)
        taken.clear()
        with torch.no_grad():
            mixed = model(**batch, adapter_names=names).logits
            for r in (0, 1, 2):
                torch.testing.assert_close(mixed[r], _alone(model, batch, r, names[r]), rtol=1e-5, atol=1e-5)
        assert any(taken) if rows == len(NAMES) else not any(taken), (rows, taken)


def test_a_hot_swapped_delta_reaches_the_mixed_batch():
    arch = ARCHS["llama"]
    model = _two_adapters(arch)
    batch = _batch(arch, 2)
    with torch.no_grad():
        model(**batch, adapter_names=["one", "two"])  # builds the per-adapter term caches
        model.add_adapter("three", sam_peft.SAMConfig(task_type=arch.task_type, sparsity=0.05, selection="random"))
        for target in targets(model, "three"):
            target.values.copy_(0.3 * torch.randn(target.values.shape, generator=torch.Generator().manual_seed(3)))
        other = sam_peft.SparseDelta.from_peft(model, "three")
        expected = _alone(model, batch, 0, "three")
        sam_peft.hotswap_adapter(model, other, "one")  # other indices and values, in place
        mixed = model(**batch, adapter_names=["one", "two"]).logits
        torch.testing.assert_close(mixed[0], expected, rtol=1e-5, atol=1e-5)
