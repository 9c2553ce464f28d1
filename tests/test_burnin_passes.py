"""The burn-in in several passes (`max_statistics_bytes`): the same selection as one pass, bit for bit, for every
data-driven signal and both allocations, with dropout on, ties, clipping and shuffled loaders; bounded statistics;
and the refusals (data read once, a budget below one tensor, FSDP2, a loader that does not replay)."""

from __future__ import annotations

import copy
import logging
import random

import conftest
import pytest
import torch
from conftest import SEQ, VOCAB, make_bert, make_llama, sam_model
from peft import get_peft_model

import sam_peft
from sam_peft.burnin import statistics as statistics_module
from sam_peft.ranking.budget import Budget
from sam_peft.ranking.signals import SIGNALS
from sam_peft.ranking.topk import RunningTop, top_entries
from sam_peft.tuner.targets import targets

SPARSITY = 0.02
DATA_SIGNALS = [name for name, signal in SIGNALS.items() if signal.needs_data]


# --------------------------------------------------------------------------- helpers


def statistic_sizes(model, selection: str, itemsize: int = 4) -> list[int]:
    """Bytes of each target's statistics, in target order."""
    per_entry = itemsize * len(SIGNALS[selection].statistics)
    return [t.param.numel() * per_entry for t in targets(model, "default")]


def budgets(sizes: list[int]) -> list[int]:
    """Budgets giving 2 passes, a few, and the most (one largest tensor's statistics)."""
    return [sum(sizes) // 2 + max(sizes), sum(sizes) // 4, max(sizes)]


def select(model, data, **kwargs):
    """Select from a fixed random state; returns the report, the indices and a draw from the state after."""
    torch.manual_seed(1234)
    random.seed(1234)
    report = sam_peft.select_parameters(model, data, progress=False, **kwargs)
    return report, sam_peft.selected_indices(model), (torch.rand(2), random.random())


def assert_same(single, passes) -> None:
    (report_1, chosen_1, after_1), (report_n, chosen_n, after_n) = single, passes
    assert list(chosen_1) == list(chosen_n)
    for name in chosen_1:
        assert torch.equal(chosen_1[name], chosen_n[name]), name
    assert report_1.score_summary == report_n.score_summary
    assert report_1.selected == report_n.selected and report_1.steps == report_n.steps
    assert torch.equal(after_1[0], after_n[0]) and after_1[1] == after_n[1]  # the random state ends the same


def llama_batches(n: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.fixture(scope="module")
def bert():
    return make_bert(dropout=0.1)  # transformers' default dropout: the burn-in runs in train mode with it on


@pytest.fixture(scope="module")
def batches():
    return conftest.make_batches(3, min_id=0, padding=2)


# --------------------------------------------------------------------------- 1. the same selection as one pass


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
@pytest.mark.parametrize("selection", DATA_SIGNALS)
def test_passes_select_what_one_pass_selects(bert, batches, selection, allocation):
    model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation=allocation)
    single = select(model, batches, selection=selection)
    assert single[0].passes == 1
    seen = []
    for max_bytes in budgets(statistic_sizes(model, selection)):
        model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation=allocation)
        result = select(model, batches, selection=selection, max_statistics_bytes=max_bytes)
        assert_same(single, result)
        seen.append(result[0].passes)
    assert seen[0] == 2 and seen[-1] > seen[1] > 2  # 2, a few and the most passes


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
@pytest.mark.parametrize("options", [dict(max_grad_norm=1e-3), dict(per_example=True),
                                     dict(per_example=True, max_grad_norm=1e-3), dict(statistics_dtype="bf16"),
                                     dict(selection="sam_hessian", max_grad_norm=1e-3, hutchinson_samples=2),
                                     dict(dropout=False)])
def test_passes_with_clipping_per_example_bf16(bert, batches, options, allocation):
    """Clipping (the first pass's coefficients replayed; a tiny norm so every batch is clipped), per-example
    Fisher, bf16 statistics, Hutchinson probes and eval mode."""
    selection = options.get("selection", "fisher" if options.get("per_example") else "sam")
    options = {"selection": selection, **options}
    model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation=allocation)
    single = select(model, batches, **options)
    itemsize = 2 if options.get("statistics_dtype") == "bf16" else 4
    max_bytes = budgets(statistic_sizes(model, selection, itemsize))[1]
    model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation=allocation)
    result = select(model, batches, max_statistics_bytes=max_bytes, **options)
    assert result[0].passes > 2
    assert_same(single, result)


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
def test_passes_on_a_decoder_with_attention_dropout(allocation):
    """A tiny Llama (bias-free linears, grouped-query attention, attention dropout on) selects the same."""
    base = make_llama(attention_dropout=0.1)
    data = llama_batches(2)

    def model():
        return get_peft_model(copy.deepcopy(base), sam_peft.SAMConfig(sparsity=SPARSITY, allocation=allocation,
                                                                    task_type="CAUSAL_LM"))

    single = select(model(), data, selection="sam")
    for max_bytes in budgets(statistic_sizes(model(), "sam"))[::2]:
        result = select(model(), data, selection="sam", max_statistics_bytes=max_bytes)
        assert result[0].passes >= 2
        assert_same(single, result)


def test_ties_break_as_one_pass(batches):
    """Token ids from 3 rows of the embeddings and a budget reaching into the zero scores (the unused rows): the
    k-th largest score is 0, so the choice among equal (zero) scores decides many entries."""
    base = make_bert(dropout=0.1)
    few_ids = [{**b, "input_ids": b["input_ids"] % 3} for b in batches]
    for allocation in ("per_tensor", "global"):
        model = sam_model(copy.deepcopy(base), sparsity=0.9, allocation=allocation)
        single = select(model, few_ids, selection="sam")
        assert single[0].score_summary["kept_min"] == 0.0  # ties at zero were kept
        for max_bytes in budgets(statistic_sizes(model, "sam")):
            model = sam_model(copy.deepcopy(base), sparsity=0.9, allocation=allocation)
            assert_same(single, select(model, few_ids, selection="sam", max_statistics_bytes=max_bytes))


def test_running_top_equals_top_entries_with_ties():
    """The merged global top-k, fed a few tensors at a time, is top_entries' set over all of them at once, with
    heavy ties (few distinct values, ±0.0) and every budget from 0 to all entries."""
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 6, (1,), generator=g))
        tensors = [torch.randint(-2, 3, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g).float()
                   for _ in range(n)]
        if trial % 4 == 0:
            tensors = [t * 0.0 * (-1) ** i for i, t in enumerate(tensors)]  # all ties, ±0.0
        named = [(f"t{i}", t) for i, t in enumerate(tensors)]
        total = sum(t.numel() for t in tensors)
        k = int(torch.randint(0, total + 1, (1,), generator=g))
        expected = top_entries(named, Budget((0,) * n, (k,)))
        running, start = RunningTop(k, torch.device("cpu")), 0
        while start < n:
            stop = start + int(torch.randint(1, n - start + 1, (1,), generator=g))
            running.add(named[start:stop])
            start = stop
        assert running.scores.numel() == k
        for (name, _), chosen in zip(named, running.chosen([t.numel() for t in tensors])):
            assert torch.equal(expected[name], chosen), (trial, name)


# --------------------------------------------------------------------------- 2. loaders that replay


def test_shuffled_loaders_replay(bert):
    """A shuffling DataLoader draws its order from the global generator, or from its own; both are restored."""
    rows = [{k: v[i] for k, v in b.items()} for b in conftest.make_batches(4, min_id=0) for i in range(4)]
    for generator in (None, torch.Generator().manual_seed(7)):
        state = None if generator is None else generator.get_state()

        def loader(generator=generator, state=state):
            if state is not None:
                generator.set_state(state)
            return torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True, generator=generator)

        model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation="global")
        single = select(model, loader(), num_steps=3)
        model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation="global")
        result = select(model, loader(), num_steps=3, max_statistics_bytes=budgets(statistic_sizes(model, "sam"))[1])
        assert result[0].passes > 2
        assert_same(single, result)


def test_a_stream_with_num_steps_replays(bert, batches):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from batches

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY)
    single = select(model, loader, num_steps=3)
    model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY)
    max_bytes = budgets(statistic_sizes(model, "sam"))[0]
    assert_same(single, select(model, loader, num_steps=3, max_statistics_bytes=max_bytes))


def test_data_read_once_is_refused(bert, batches):
    max_bytes = budgets(statistic_sizes(sam_model(copy.deepcopy(bert)), "sam"))[0]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from batches

    for data, kwargs, match in [(iter(batches), {}, "iterator that can be read only once"),
                                ((b for b in batches), {"num_steps": 2}, "iterator that can be read only once"),
                                (torch.utils.data.DataLoader(Stream(), batch_size=None), {}, "pass num_steps")]:
        model = sam_model(copy.deepcopy(bert))
        with pytest.raises(sam_peft.ConfigError, match=match):
            sam_peft.select_parameters(model, data, progress=False, max_statistics_bytes=max_bytes, **kwargs)
        with pytest.raises(sam_peft.NotSelectedError):
            sam_peft.selected_indices(model)
    # an iterator is fine when everything fits in one pass
    report = sam_peft.select_parameters(sam_model(copy.deepcopy(bert)), iter(batches), progress=False,
                                        max_statistics_bytes=10**9)
    assert report.passes == 1


def test_a_loader_that_does_not_replay_is_refused(bert, batches):
    """Batches that change between iterations are caught by the first pass's recorded losses."""

    class Drifting:
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return len(batches)

        def __iter__(self):
            self.epoch += 1
            for b in batches:
                yield {**b, "labels": (b["labels"] + self.epoch) % 2}

    model = sam_model(copy.deepcopy(bert))
    with pytest.raises(sam_peft.SelectionError, match="pass 2 did not replay the first pass"):
        sam_peft.select_parameters(model, Drifting(), progress=False,
                                   max_statistics_bytes=budgets(statistic_sizes(model, "sam"))[0])
    with pytest.raises(sam_peft.NotSelectedError):
        sam_peft.selected_indices(model)


# --------------------------------------------------------------------------- 3. memory, budgets, refusals


def test_statistics_held_stay_within_the_budget(bert, batches, monkeypatch, caplog):
    made = []
    original = statistics_module.Statistics.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self.nbytes)

    monkeypatch.setattr(statistics_module.Statistics, "__init__", recording)
    model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation="global")
    sizes = statistic_sizes(model, "fisher")
    max_bytes = budgets(sizes)[1]
    with caplog.at_level(logging.INFO, logger="sam_peft"):
        report = sam_peft.select_parameters(model, batches, progress=False, selection="fisher",
                                            max_statistics_bytes=max_bytes)
    assert len(made) == report.passes > 2
    assert max(made) == report.statistics_bytes <= max_bytes
    assert sum(made) == sum(sizes)  # every target's statistics, once
    assert any(f"{report.passes} passes" in r.getMessage() for r in caplog.records)
    assert f"passes={report.passes}" in str(report) and report.to_dict()["passes"] == report.passes
    made.clear()
    report = sam_peft.select_parameters(sam_model(copy.deepcopy(bert)), batches, progress=False, selection="fisher")
    assert made == [sum(sizes)] and report.statistics_bytes == sum(sizes) and report.passes == 1


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
def test_a_pass_holds_no_scores_of_an_earlier_pass(bert, batches, monkeypatch, allocation):
    """Each pass's statistics are allocated after the previous group's scores are released: a pass holds one
    group's statistics, not also the last group's scores (which would double the budget)."""
    import weakref

    scores, alive_at_start = [], []
    original_init, original_pop = statistics_module.Statistics.__init__, statistics_module.Statistics.pop_scores

    def init(self, *args, **kwargs):
        alive_at_start.append(sum(ref() is not None for ref in scores))
        original_init(self, *args, **kwargs)

    def pop(self, *args, **kwargs):
        score = original_pop(self, *args, **kwargs)
        scores.append(weakref.ref(score))
        return score

    monkeypatch.setattr(statistics_module.Statistics, "__init__", init)
    monkeypatch.setattr(statistics_module.Statistics, "pop_scores", pop)
    model = sam_model(copy.deepcopy(bert), sparsity=SPARSITY, allocation=allocation)
    report = sam_peft.select_parameters(model, batches, progress=False, selection="sam",
                                        max_statistics_bytes=budgets(statistic_sizes(model, "sam"))[1])
    assert report.passes > 2 and len(alive_at_start) == report.passes
    assert alive_at_start == [0] * report.passes


def test_a_budget_below_one_tensor_names_it(bert, batches):
    model = sam_model(copy.deepcopy(bert))
    sizes = statistic_sizes(model, "sam_hessian")
    largest = targets(model, "default")[sizes.index(max(sizes))].name
    with pytest.raises(sam_peft.ConfigError, match=rf"'{largest}' \({max(sizes):,} bytes.*≥ {max(sizes):,}"):
        sam_peft.select_parameters(model, batches, progress=False, selection="sam_hessian",
                                   max_statistics_bytes=max(sizes) - 1)


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "1GB"])
def test_max_statistics_bytes_is_checked(value, batches):
    with pytest.raises(sam_peft.ConfigError, match="max_statistics_bytes"):
        sam_peft.select_parameters(sam_model(), batches, progress=False, max_statistics_bytes=value)


@pytest.mark.parametrize("selection", ["magnitude", "random", "bitfit"])
def test_data_free_selections_ignore_the_budget(selection):
    model = sam_model(make_bert(), selection=selection, sparsity=SPARSITY)
    before = sam_peft.selected_indices(model)
    report = sam_peft.select_parameters(model, progress=False, max_statistics_bytes=1)
    assert report.passes == 0 and report.statistics_bytes == 0
    after = sam_peft.selected_indices(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_sharded_passes_are_refused(bert, batches):
    from sam_peft.burnin.options import BurnInOptions
    from sam_peft.burnin.select import _plan

    model = sam_model(copy.deepcopy(bert))
    found = targets(model, "default")
    options = BurnInOptions("sam", max_statistics_bytes=budgets(statistic_sizes(model, "sam"))[0])
    with pytest.raises(sam_peft.ConfigError, match="FSDP2"):
        _plan(found, batches, options, sharded=True)
    assert len(_plan(found, batches, BurnInOptions("sam", max_statistics_bytes=10**9), sharded=True)) == 1


def test_reentrant_checkpointing_is_refused_clearly(bert, batches):
    model = sam_model(copy.deepcopy(bert))
    max_bytes = budgets(statistic_sizes(model, "sam"))[0]
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(sam_peft.SelectionError, match="use_reentrant"):
        sam_peft.select_parameters(model, batches, progress=False, max_statistics_bytes=max_bytes)
    single = sam_model(copy.deepcopy(bert))
    single.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    passes = sam_model(copy.deepcopy(bert))
    passes.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(select(single, batches), select(passes, batches, max_statistics_bytes=max_bytes))


# --------------------------------------------------------------------------- 4. the Trainer callback


def test_callback_passes_select_what_one_pass_selects(tmp_path):
    """SAMCallback(max_statistics_bytes=...) on the Trainer's shuffled train dataloader."""
    import datasets
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(5)
    data = datasets.Dataset.from_dict({
        "input_ids": torch.randint(0, VOCAB, (24, SEQ), generator=g).tolist(),
        "attention_mask": torch.ones(24, SEQ, dtype=torch.long).tolist(),
        "labels": torch.randint(0, 2, (24,), generator=g).tolist(),
    })
    base = make_bert(dropout=0.1)
    results = []
    for max_bytes in (None, budgets(statistic_sizes(sam_model(copy.deepcopy(base)), "sam"))[1]):
        model = sam_model(copy.deepcopy(base), sparsity=SPARSITY, allocation="global")
        callback = sam_peft.SAMCallback(burn_in_steps=4, max_statistics_bytes=max_bytes)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
        results.append((callback.report, sam_peft.selected_indices(model)))
    (single, chosen_1), (passes, chosen_n) = results
    assert single.passes == 1 and passes.passes > 2
    assert all(torch.equal(chosen_1[n], chosen_n[n]) for n in chosen_1)


# --------------------------------------------------------------------------- 5. data parallel (whole weights)

WORKER = """
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[4])
import test_burnin_passes as t

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
try:
    torch.save(t.rank_selections(rank), out)
    dist.barrier()
finally:
    dist.destroy_process_group()
"""


def rank_selections(rank: int | None) -> dict:
    """Selections over ranks' halves of 4 batches in several passes (`rank=None`: all 4 batches, one pass)."""
    import sam_peft

    base, data = make_bert(), conftest.make_batches(4, seed=7, min_id=0, padding=2)
    result = {}
    for selection, allocation in (("sam", "global"), ("fisher", "per_tensor")):
        model = sam_model(copy.deepcopy(base), sparsity=SPARSITY, allocation=allocation)
        max_bytes = None if rank is None else budgets(statistic_sizes(model, selection))[1]
        report = sam_peft.select_parameters(model, data if rank is None else data[rank::2], dropout=False,
                                            progress=False, selection=selection, max_statistics_bytes=max_bytes)
        result[(selection, allocation)] = (report.passes, sam_peft.selected_indices(model))
    return result


def test_data_parallel_passes_equal_one_process(tmp_path):
    from pathlib import Path

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    conftest.run_two_ranks(lambda rank, port: [str(script), str(rank), port, str(outs[rank]),
                                               str(Path(__file__).parent)], timeout=180)
    single = rank_selections(None)
    for out in outs:
        for case, (passes, chosen) in torch.load(out).items():
            assert passes > 2 and single[case][0] == 1
            assert all(torch.equal(chosen[n], single[case][1][n]) for n in chosen), case
