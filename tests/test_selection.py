"""Tests of the burn-in selection: exact agreement with a plain-torch reference, state restoration, errors,
data-free selections, distributed selection, and the Trainer callback end to end."""

from __future__ import annotations

import copy
import logging
import math
import textwrap
from functools import partial
from pathlib import Path

import conftest
import pytest
import torch
from conftest import SEQ, VOCAB, make_bert, run_two_ranks, sam_model
from peft import get_peft_model
from safetensors import safe_open
from saved_files import decoded_file

import sam_peft
from sam_peft.ranking.budget import entry_budget
from sam_peft.tuner.targets import targets

REPO_ROOT = Path(__file__).resolve().parents[1]
SPARSITY = 0.02


# --------------------------------------------------------------------------- helpers


# conftest's BERT with transformers' default dropout (the burn-in runs with and without it), and its batches
# with ids from the whole vocabulary and some padding, so attention masks matter
tiny_bert = partial(make_bert, dropout=0.1)
make_batches = partial(conftest.make_batches, min_id=0, padding=2)


def tuned_params(base) -> list[tuple[str, torch.nn.Parameter]]:
    """Base parameters the adapter targets by default: every one except the classifier head, in order."""
    return [(n, p) for n, p in base.named_parameters() if not n.startswith("classifier.")]


def peft_model(base, **kwargs):
    return sam_model(copy.deepcopy(base), **{"sparsity": SPARSITY, **kwargs})


def reference_statistics(base, batches, kind: str, per_example: bool = False) -> dict[str, torch.Tensor]:
    """Σ_t g_t (kind='sam') or Σ_t g_t² (kind='fisher') per tuned parameter, with plain autograd."""
    model = copy.deepcopy(base)
    model.eval()
    params = tuned_params(model)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    pieces = []
    for batch in batches:
        if per_example:
            size = batch["input_ids"].shape[0]
            pieces += [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)]
        else:
            pieces.append(batch)
    for piece in pieces:
        model.zero_grad(set_to_none=True)
        loss = model(**piece).loss
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, grads):
            g = torch.zeros_like(p) if g is None else g
            acc[n] += g if kind == "sam" else g * g
    return acc


def reference_scores(base, batches, kind: str, per_example: bool = False) -> dict[str, torch.Tensor]:
    stats = reference_statistics(base, batches, kind, per_example)
    return {n: (s.square() if kind == "sam" else s) for n, s in stats.items()}


def stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of a flat tensor by a full stable descending sort, sorted ascending."""
    order = torch.sort(-scores.reshape(-1).double(), stable=True).indices
    return order[:k].sort().values


def reference_selection(scores: dict[str, torch.Tensor], allocation: str) -> dict[str, torch.Tensor]:
    if allocation == "per_tensor":
        return {n: stable_top(s, entry_budget(SPARSITY, s.numel())) for n, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    top = stable_top(flat, entry_budget(SPARSITY, flat.numel()))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        inside = top[(top >= start) & (top < start + size)]
        out[n] = inside - start
        start += size
    return out


def assert_same_indices(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name].long(), expected[name].long()), name


def value_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".sparsediff_values." in n}


@pytest.fixture(scope="module")
def base():
    return tiny_bert()


@pytest.fixture(scope="module")
def batches():
    return make_batches(3)


# --------------------------------------------------------------------------- 1. exact agreement with a reference


@pytest.mark.parametrize("kind", ["sam", "fisher"])
def test_selection_matches_plain_torch_reference(base, batches, kind):
    scores = reference_scores(base, batches, kind)
    assert [n for n, _ in tuned_params(base)] == list(scores)
    other = reference_selection(reference_scores(base, batches, "fisher" if kind == "sam" else "sam"), "per_tensor")
    mine = reference_selection(scores, "per_tensor")
    assert any(not torch.equal(mine[n], other[n]) for n in mine)  # the two signals select differently
    for allocation in ("per_tensor", "global"):
        model = peft_model(base, allocation=allocation)
        report = sam_peft.select_parameters(model, batches, dropout=False, progress=False, selection=kind)
        expected = reference_selection(scores, allocation)
        assert_same_indices(sam_peft.selected_indices(model), expected)
        assert report.steps == len(batches)
        assert report.selection == kind
        total = sum(s.numel() for s in scores.values())
        if allocation == "per_tensor":
            assert report.selected == sum(entry_budget(SPARSITY, s.numel()) for s in scores.values())
        else:
            assert report.selected == entry_budget(SPARSITY, total)
        assert report.total == total


def test_per_example_fisher_matches_reference(base, batches):
    scores = reference_scores(base, batches[:2], "fisher", per_example=True)
    model = peft_model(base, selection="fisher")
    sam_peft.select_parameters(model, batches[:2], dropout=False, progress=False, per_example=True)
    assert_same_indices(sam_peft.selected_indices(model), reference_selection(scores, "per_tensor"))
    # per-example squares differ from batch squares: the masks are not the same
    batch_level = reference_selection(reference_scores(base, batches[:2], "fisher"), "per_tensor")
    assert any(not torch.equal(batch_level[n], sam_peft.selected_indices(model)[n]) for n in batch_level)


@pytest.mark.parametrize(
    ("allocation", "attention"),
    [
        ("per_tensor", "eager"),
        ("global", "eager"),
        ("per_tensor", "sdpa"),
    ],
)
def test_sam_hessian_selects_budget(batches, allocation, attention):
    base = tiny_bert(attn_implementation=attention)
    assert base.config._attn_implementation == attention
    model = peft_model(base, allocation=allocation)
    report = sam_peft.select_parameters(model, batches[:2], dropout=False, progress=False,
                                        selection="sam_hessian", hutchinson_samples=2)
    chosen = sam_peft.selected_indices(model)
    numels = {n: p.numel() for n, p in tuned_params(base)}
    assert set(chosen) == set(numels)
    for name, idx in chosen.items():
        assert idx.dtype == torch.long
        assert idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < numels[name])
        assert idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all())
        if allocation == "per_tensor":
            assert idx.numel() == entry_budget(SPARSITY, numels[name])
    if allocation == "global":
        assert report.selected == entry_budget(SPARSITY, sum(numels.values()))
    assert all(math.isfinite(v) for v in report.score_summary.values())
    assert model.peft_config["default"].selection == "sam_hessian"


# --------------------------------------------------------------------------- 2. state after selection


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _disabled(model) -> dict[str, bool]:
    return {n: m._disable_adapters for n, m in model.named_modules() if hasattr(m, "sparsediff_values")}


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
def test_state_after_selection(base, batches, allocation):
    model = peft_model(base, allocation=allocation)
    model.train()
    flags, disabled = _flags(model), _disabled(model)
    assert model.peft_config["default"].counts is None
    with pytest.raises(sam_peft.NotSelectedError):
        sam_peft.selected_indices(model)

    report = sam_peft.select_parameters(model, batches, dropout=False, progress=False)

    # flags restored, except that a values tensor left without entries is frozen (it could never change)
    assert _flags(model) == {n: f and not (".sparsediff_values." in n and model.get_parameter(n).numel() == 0)
                             for n, f in flags.items()}
    assert _disabled(model) == disabled
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    values = value_params(model)
    assert values and all(torch.count_nonzero(v) == 0 for v in values.values())
    assert all(v.requires_grad == (v.numel() > 0) for v in values.values())
    assert all(v.dtype == torch.float32 for v in values.values())

    counts = model.peft_config["default"].counts
    assert counts is not None and set(counts) == {n for n, _ in tuned_params(base)}
    assert {n: int(i.numel()) for n, i in sam_peft.selected_indices(model).items()} == counts
    assert isinstance(report, sam_peft.SelectionReport)
    assert report.selected == sum(counts.values()) > 0
    assert report.per_parameter[next(iter(counts))]["selected"] == counts[next(iter(counts))]
    assert isinstance(report.per_layer, dict) and set(report.per_layer) == {"other", "0", "1"}
    assert isinstance(report.per_kind, dict) and "attention.self.query.weight" in report.per_kind
    assert all(0.0 <= d <= 1.0 for d in [*report.per_layer.values(), *report.per_kind.values()])
    assert 0.0 < report.density <= SPARSITY
    assert report.to_dict()["selected"] == report.selected
    text = str(report)
    assert "selection=sam" in text and f"{report.selected:,}" in text

    # the adapted model (zero values) computes exactly the base model's function
    model.eval()
    reference = copy.deepcopy(base).eval()
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    # the base weights are untouched
    base_weights = dict(tuned_params(base))
    for target in targets(model, "default"):
        assert torch.equal(target.param, base_weights[target.name]), target.name


def test_flags_restored_when_burn_in_raises(base, batches):
    model = peft_model(base)
    model.eval()
    flags, disabled = _flags(model), _disabled(model)
    no_labels = [{k: v for k, v in batches[0].items() if k != "labels"}]
    with pytest.raises(Exception):  # noqa: B017 - the type is checked in test_missing_labels_is_selection_error
        sam_peft.select_parameters(model, no_labels, dropout=True, progress=False)
    assert _flags(model) == flags
    assert _disabled(model) == disabled
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert model.peft_config["default"].counts is None
    # a later selection still works and matches the reference
    sam_peft.select_parameters(model, batches, dropout=False, progress=False)
    assert_same_indices(sam_peft.selected_indices(model),
                        reference_selection(reference_scores(base, batches, "sam"), "per_tensor"))


def test_missing_labels_is_selection_error(base, batches):
    model = peft_model(base)
    no_labels = [{k: v for k, v in batches[0].items() if k != "labels"}]
    with pytest.raises(sam_peft.SelectionError, match="labels"):
        sam_peft.select_parameters(model, no_labels, dropout=False, progress=False)


# --------------------------------------------------------------------------- 3. errors


def test_empty_dataloader(base):
    model = peft_model(base)
    with pytest.raises(sam_peft.SelectionError, match="empty"):
        sam_peft.select_parameters(model, [], progress=False)
    with pytest.raises(sam_peft.SelectionError):
        sam_peft.select_parameters(model, iter([]), num_steps=2, progress=False)  # no len(): found out while iterating

    def endless():
        while True:
            yield from make_batches(2)

    assert sam_peft.select_parameters(model, endless(), num_steps=3, progress=False).steps == 3
    assert sam_peft.select_parameters(model, iter(make_batches(2)), progress=False).steps == 2  # one pass
    model = peft_model(base)
    with pytest.raises(ValueError, match="needs data"):
        sam_peft.select_parameters(model, None, progress=False)
    assert model.peft_config["default"].counts is None


def test_callback_on_a_stream_needs_burn_in_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield from _dataset(8, 3)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    model = conftest.sam_model()
    with pytest.raises(sam_peft.SelectionError, match="burn_in_steps=N"):  # it hung before
        Trainer(model=model, args=args, train_dataset=Stream(), callbacks=[sam_peft.SAMCallback()]).train()
    Trainer(model=model, args=args, train_dataset=Stream(), callbacks=[sam_peft.SAMCallback(burn_in_steps=2)]).train()
    assert model.peft_config["default"].counts is not None


def test_num_steps(base, batches, caplog):
    model = peft_model(base)
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        report = sam_peft.select_parameters(model, batches, num_steps=10, dropout=False, progress=False)
    assert report.steps == len(batches)
    assert any("10" in r.getMessage() and str(len(batches)) in r.getMessage() for r in caplog.records)
    assert_same_indices(sam_peft.selected_indices(model),
                        reference_selection(reference_scores(base, batches, "sam"), "per_tensor"))

    # fewer steps than batches: only the first ones are used
    model = peft_model(base)
    report = sam_peft.select_parameters(model, batches, num_steps=2, dropout=False, progress=False)
    assert report.steps == 2
    assert_same_indices(sam_peft.selected_indices(model),
                        reference_selection(reference_scores(base, batches[:2], "sam"), "per_tensor"))
    with pytest.raises(ValueError):
        sam_peft.select_parameters(peft_model(base), batches, num_steps=0, progress=False)


def test_num_steps_larger_than_unsized_iterator_warns(base, batches, caplog):
    model = peft_model(base)
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        report = sam_peft.select_parameters(model, iter(batches), num_steps=10, dropout=False, progress=False)
    assert report.steps == len(batches)  # uses what there is
    assert any("10" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_nan_loss_is_an_error_naming_the_step(base, batches):
    model = peft_model(base)
    flags = _flags(model)
    # every label ignored: the mean cross-entropy over no example is NaN, at the second step
    ignored = dict(batches[1], labels=torch.full_like(batches[1]["labels"], -100))
    with pytest.raises(sam_peft.SelectionError, match="step 1"):
        sam_peft.select_parameters(model, [batches[0], ignored, batches[2]], dropout=False, progress=False)
    assert _flags(model) == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.peft_config["default"].counts is None

    # a NaN base weight: the very first step fails
    model = peft_model(base)
    with torch.no_grad():
        model.get_base_model().bert.pooler.dense.get_base_layer().weight[0, 0] = float("nan")
    with pytest.raises(sam_peft.SelectionError, match="step 0"):
        sam_peft.select_parameters(model, batches, dropout=False, progress=False)
    assert _flags(model) == flags


# --------------------------------------------------------------------------- 4. data-free selections


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
def test_magnitude_selection(base, allocation):
    model = peft_model(base, selection="magnitude", allocation=allocation)
    assert model.peft_config["default"].counts is not None  # selected at creation
    scores = {n: p.detach().abs() for n, p in tuned_params(base)}
    assert_same_indices(sam_peft.selected_indices(model), reference_selection(scores, allocation))
    # select_parameters on a data-free adapter needs no data and re-makes the same selection
    report = sam_peft.select_parameters(model, progress=False)
    assert report.steps == 0
    assert_same_indices(sam_peft.selected_indices(model), reference_selection(scores, allocation))


def test_random_selection_is_seeded(base):
    first = sam_peft.selected_indices(peft_model(base, selection="random", seed=3))
    again = sam_peft.selected_indices(peft_model(base, selection="random", seed=3))
    other = sam_peft.selected_indices(peft_model(base, selection="random", seed=4))
    assert_same_indices(again, first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    for name, p in tuned_params(base):
        assert first[name].numel() == other[name].numel() == entry_budget(SPARSITY, p.numel())
    glob = sam_peft.selected_indices(peft_model(base, selection="random", seed=3, allocation="global"))
    total = sum(p.numel() for _, p in tuned_params(base))
    assert sum(i.numel() for i in glob.values()) == entry_budget(SPARSITY, total)


def test_bitfit_selects_every_bias(base):
    model = peft_model(base, selection="bitfit")
    chosen = sam_peft.selected_indices(model)
    assert set(chosen) == {n for n, _ in tuned_params(base)}
    n_bias = 0
    for name, p in tuned_params(base):
        if name.endswith(".bias"):
            assert torch.equal(chosen[name], torch.arange(p.numel())), name
            n_bias += 1
        else:
            assert chosen[name].numel() == 0, name
    assert n_bias > 0
    assert all(torch.count_nonzero(v) == 0 for v in value_params(model).values())


# --------------------------------------------------------------------------- 5. distributed

WORKER = textwrap.dedent(
    """
    import sys

    import torch
    import torch.distributed as dist

    sys.path.insert(0, sys.argv[4])
    import test_selection as t

    import sam_peft

    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        base = t.tiny_bert()
        batches = t.make_batches(4, seed=7)
        mine = [batches[rank], batches[rank + 2]]
        result = {}
        for kind, allocation in (("sam", "per_tensor"), ("fisher", "global")):
            model = t.peft_model(base, allocation=allocation)
            sam_peft.select_parameters(model, mine, dropout=False, progress=False, selection=kind)
            result[(kind, allocation)] = sam_peft.selected_indices(model)
        torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    """
)


def test_distributed_selection_equals_single_process(base, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    run_two_ranks(lambda rank, port: [str(script), str(rank), port, str(outs[rank]), str(Path(__file__).parent)],
                  timeout=120)

    batches = make_batches(4, seed=7)
    results = [torch.load(out) for out in outs]
    for kind, allocation in (("sam", "per_tensor"), ("fisher", "global")):
        model = peft_model(base, allocation=allocation)
        sam_peft.select_parameters(model, batches, dropout=False, progress=False, selection=kind)
        single = sam_peft.selected_indices(model)
        for result in results:
            assert_same_indices(result[(kind, allocation)], single)
        # and the data-parallel split really matters: one rank's half alone selects something else
        alone = peft_model(base, allocation=allocation)
        sam_peft.select_parameters(alone, batches[0::2], dropout=False, progress=False, selection=kind)
        assert any(not torch.equal(sam_peft.selected_indices(alone)[n], single[n]) for n in single)


# --------------------------------------------------------------------------- 6. Trainer end to end


def _dataset(n: int, seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({
        "input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=g).tolist(),
        "attention_mask": torch.ones(n, SEQ, dtype=torch.long).tolist(),
        "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
    })


def _trainer(model, out_dir, callback, **overrides):
    from transformers import Trainer, TrainingArguments

    kwargs = dict(
        output_dir=str(out_dir), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.1, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3, save_steps=3,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    kwargs.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=_dataset(32, 11),
                   eval_dataset=_dataset(8, 12), callbacks=[callback])


def _check_only_selected_changed(merged, base, chosen) -> int:
    changed = 0
    merged_params = dict(merged.named_parameters())
    for name, p in tuned_params(base):
        diff = (merged_params[name].detach() != p.detach()).reshape(-1).nonzero().squeeze(1)
        assert bool(torch.isin(diff, chosen[name]).all()), name  # exactly equal outside the selection
        changed += diff.numel()
    return changed


def test_trainer_end_to_end_and_resume(base, tmp_path):
    model = peft_model(base)
    callback = sam_peft.SAMCallback(burn_in_steps=3)
    trainer = _trainer(model, tmp_path / "run", callback)
    trainer.train()

    config = model.peft_config["default"]
    assert config.counts is not None
    assert callback.report is not None and callback.report.steps == 3
    chosen = sam_peft.selected_indices(model)
    assert {n: int(i.numel()) for n, i in chosen.items()} == config.counts
    assert any(torch.count_nonzero(v) > 0 for v in value_params(model).values())

    # save: only the sparse deltas and the dense head
    save_dir = tmp_path / "saved"
    trainer.save_model(str(save_dir))
    with safe_open(str(save_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("sparsediff_" in k or ".classifier." in k for k in keys), keys
    assert any("classifier.weight" in k for k in keys) and any("classifier.bias" in k for k in keys)
    assert sum(".sparsediff_indices." in k for k in keys) == len(config.counts)
    assert sum(".sparsediff_values." in k for k in keys) == len(config.counts)

    # the checkpoint's indices
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file()
    ckpt_tensors = decoded_file(ckpt / "adapter_model.safetensors")

    # merged model differs from the base only at selected entries; the head changed
    merged = copy.deepcopy(model).merge_and_unload()
    assert _check_only_selected_changed(merged, base, chosen) > 0
    assert not torch.equal(merged.classifier.weight, base.classifier.weight)

    # resume from the checkpoint with a fresh adapter and callback: no new burn-in, same indices
    model2 = peft_model(base)
    callback2 = sam_peft.SAMCallback(burn_in_steps=3)
    trainer2 = _trainer(model2, tmp_path / "run", callback2)
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert callback2.report is None
    assert trainer2.state.global_step == 6
    chosen2 = sam_peft.selected_indices(model2)
    assert_same_indices(chosen2, chosen)
    for name, idx in chosen2.items():
        module, attr = name.rsplit(".", 1)
        key = next(k for k in ckpt_tensors if k.endswith(f"{module}.sparsediff_indices.{attr}"))
        assert torch.equal(ckpt_tensors[key].long(), idx), name
    merged2 = copy.deepcopy(model2).merge_and_unload()
    assert _check_only_selected_changed(merged2, base, chosen2) > 0


def test_trainer_global_allocation_trains_selected_values(base, tmp_path):
    model = peft_model(base, allocation="global")
    assert all(v.numel() == 0 for v in value_params(model).values())  # placeholders before selection
    callback = sam_peft.SAMCallback(burn_in_steps=3)
    trainer = _trainer(model, tmp_path / "run", callback, eval_strategy="no", save_strategy="no")
    trainer.train()

    config = model.peft_config["default"]
    total = sum(p.numel() for _, p in tuned_params(base))
    assert sum(config.counts.values()) == entry_budget(SPARSITY, total)
    values = value_params(model)
    assert sum(v.numel() for v in values.values()) == entry_budget(SPARSITY, total)
    nonzero = sum(int(torch.count_nonzero(v)) for v in values.values())
    assert nonzero > 0  # the optimizer trained the entries installed after it was built
    merged = copy.deepcopy(model).merge_and_unload()
    assert _check_only_selected_changed(merged, base, sam_peft.selected_indices(model)) == nonzero


def test_burn_in_ignores_and_keeps_the_callers_gradients():
    """Gradients already on the base weights are neither scored nor lost: the selection equals a clean run's and
    the caller's `.grad` tensors are back afterwards."""
    clean = conftest.sam_model()
    sam_peft.select_parameters(clean, conftest.make_batches(2), progress=False)
    base = conftest.make_bert()
    stale = [(p, torch.full_like(p, 5.0)) for p in base.parameters()]
    for p, grad in stale:
        p.grad = grad.clone()
    dirty = conftest.sam_model(base)
    sam_peft.select_parameters(dirty, conftest.make_batches(2), progress=False)
    chosen, expected = sam_peft.selected_indices(dirty), sam_peft.selected_indices(clean)
    assert all(torch.equal(chosen[n], expected[n]) for n in expected)
    assert all(p.grad is not None and torch.equal(p.grad, grad) for p, grad in stale)


def test_a_failed_selection_leaves_the_configured_signal():
    model = conftest.sam_model()
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in conftest.make_batches(1)]
    with pytest.raises(sam_peft.SelectionError):
        sam_peft.select_parameters(model, unlabeled, selection="fisher", progress=False)
    assert model.peft_config["default"].selection == "sam"


def test_delta_of_an_unselected_adapter_is_refused():
    with pytest.raises(sam_peft.NotSelectedError, match="select_parameters"):
        sam_peft.SparseDelta.from_peft(conftest.sam_model())


def test_fingerprint_cache_sees_a_base_loaded_by_assignment():
    """The cached fingerprint is keyed by each weight's storage as well as its version: weights of another
    checkpoint assigned in place of the verified ones are refused."""
    model = conftest.sam_model()
    sam_peft.select_parameters(model, conftest.make_batches(2), progress=False)
    delta = sam_peft.SparseDelta.from_peft(model)
    plain = conftest.make_bert()
    delta.apply_to(plain)
    delta.remove_from(plain)
    plain.load_state_dict(conftest.make_bert(seed=7).state_dict(), assign=True)
    with pytest.raises(sam_peft.BaseModelMismatchError):
        delta.apply_to(plain)


def test_sam_hessian_with_a_parameter_the_loss_does_not_use():
    """A targeted parameter outside the loss's graph scores 0 under every signal, the Hutchinson one included."""

    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused, self.head = (torch.nn.Linear(8, 8), torch.nn.Linear(8, 8),
                                                 torch.nn.Linear(8, 2))

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.cross_entropy(self.head(torch.tanh(self.used(x))), labels)}

    torch.manual_seed(0)
    batches = [{"x": torch.randn(4, 8), "labels": torch.randint(0, 2, (4,))} for _ in range(2)]
    model = get_peft_model(Branches(), sam_peft.SparseDiffConfig(sparsity=0.1, selection="sam_hessian"))
    report = sam_peft.select_parameters(model, batches, progress=False)
    assert report.selected > 0


def test_saving_a_delta_without_shapes_says_why(tmp_path):
    from sam_peft.deltas.adapter_dir import delta_from_adapter_dir

    model = conftest.sam_model()
    sam_peft.select_parameters(model, conftest.make_batches(2), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    delta = delta_from_adapter_dir(tmp_path / "adapter")
    with pytest.raises(ValueError, match="shapes"):
        delta.save(tmp_path / "delta.safetensors")
    assert not (tmp_path / "delta.safetensors").exists()


@pytest.mark.parametrize("kwargs", [dict(num_steps=2.5), dict(hutchinson_samples=0), dict(hutchinson_samples=-3)])
def test_burn_in_arguments_are_checked_before_any_work(kwargs):
    model = conftest.sam_model()
    with pytest.raises((ValueError, sam_peft.ConfigError), match=next(iter(kwargs))):
        sam_peft.select_parameters(model, conftest.make_batches(2), progress=False, **kwargs)
    with pytest.raises(sam_peft.NotSelectedError):
        sam_peft.selected_indices(model)


def test_non_integer_seed_is_refused():
    with pytest.raises(sam_peft.ConfigError, match="seed"):
        sam_peft.SparseDiffConfig(sparsity=0.1, selection="random", seed=1.5)


def test_training_an_unselected_adapter_is_refused(tmp_path):
    model = conftest.sam_model()
    batch = conftest.make_batches(1)[0]
    model.train()
    with pytest.raises(sam_peft.NotSelectedError, match="placeholder entries"):
        model(**batch)
    with torch.no_grad():
        model(**batch)  # inference and evaluation are fine
    model.eval()
    model(**batch)
    with pytest.raises(sam_peft.NotSelectedError, match="SAMCallback"):  # a Trainer without the callback
        _trainer(conftest.sam_model(), tmp_path / "plain", transformers_callback()).train()
    sam_peft.select_parameters(model, conftest.make_batches(2), progress=False)
    model.train()
    model(**batch).loss.backward()


def test_callback_for_an_inactive_adapter_is_refused(tmp_path):
    model = conftest.sam_model()
    model.add_adapter("other", sam_peft.SAMConfig(sparsity=0.05, task_type="SEQ_CLS"))
    with pytest.raises(sam_peft.SelectionError, match="set_adapter\\('other'\\)"):
        _trainer(model, tmp_path, sam_peft.SAMCallback(burn_in_steps=2, adapter_name="other")).train()
    assert model.peft_config["other"].counts is None


def transformers_callback():
    from transformers import TrainerCallback

    return TrainerCallback()


@pytest.mark.parametrize("first", ["select", "callback"])
def test_global_allocation_resumes_whichever_way_it_was_selected(base, tmp_path, first):
    """The optimizer of a run selected before the Trainer holds only non-empty values; one built before the
    callback's selection held every placeholder. Both now save the same optimizer, so either resumes."""

    def run(out_dir, resume, selected_first, with_callback):
        model = peft_model(base, allocation="global")
        if selected_first:
            sam_peft.select_parameters(model, make_batches(3), progress=False, dropout=False)
        callback = sam_peft.SAMCallback(burn_in_steps=3, dropout=False) if with_callback else transformers_callback()
        trainer = _trainer(model, out_dir, callback, max_steps=4, save_steps=2, eval_strategy="no",
                           gradient_accumulation_steps=1)
        trainer.train(resume_from_checkpoint=resume)
        return model, callback

    reference, _ = run(tmp_path / "run", None, first == "select", first == "callback")
    expected = {n: v.detach().clone() for n, v in value_params(reference).items()}
    for with_callback in (False, True):  # a fresh adapter gets the checkpoint's entries; nothing is selected again
        model, callback = run(tmp_path / "run", str(tmp_path / "run" / "checkpoint-2"), False, with_callback)
        assert getattr(callback, "report", None) is None
        got = value_params(model)
        assert got.keys() == expected.keys()
        for name, values in expected.items():
            torch.testing.assert_close(got[name].detach(), values, rtol=0, atol=0, msg=name)


def test_burn_in_reads_tuple_outputs_and_a_given_loss_fn(base):
    """The loss as a Trainer reads it: a tuple output's first element, or a loss the caller computes."""
    reference = peft_model(base)
    sam_peft.select_parameters(reference, make_batches(3), progress=False, dropout=False)
    expected = sam_peft.selected_indices(reference)

    tuple_base = copy.deepcopy(base)
    tuple_base.config.return_dict = False
    model = peft_model(tuple_base)
    sam_peft.select_parameters(model, make_batches(3), progress=False, dropout=False)
    assert_same_indices(sam_peft.selected_indices(model), expected)

    def loss_fn(m, batch):  # the loss computed outside the model, which is given no labels
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return torch.nn.functional.cross_entropy(m(**inputs).logits, batch["labels"])

    model = peft_model(base)
    sam_peft.select_parameters(model, make_batches(3), progress=False, dropout=False, loss_fn=loss_fn)
    assert_same_indices(sam_peft.selected_indices(model), expected)

    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in make_batches(1)]
    with pytest.raises(sam_peft.SelectionError, match="include the labels, or pass loss_fn"):
        sam_peft.select_parameters(peft_model(base), unlabelled, progress=False)
    with pytest.raises(sam_peft.SelectionError, match="scalar tensor"):
        sam_peft.select_parameters(peft_model(base), make_batches(1), progress=False,
                                   loss_fn=lambda m, b: m(**b).logits)
