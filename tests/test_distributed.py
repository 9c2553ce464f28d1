"""Selection and training across processes (2 CPU ranks over gloo): FSDP2 shards, DDP with both allocations, the
burn-in options, the sharded top-k, and engines that are refused. Each multi-process scenario is one launch of
`distributed_worker.py` on two ranks; the parent compares its results with one process over the same batches."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import sam_peft
from sam_peft.parallel.collectives import Shard
from sam_peft.ranking.budget import Budget
from sam_peft.ranking.topk import radix_select, top_entries

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_worker as w  # noqa: E402
from conftest import free_port, run_two_ranks  # noqa: E402
from distributed_worker import assert_same_indices, make_batches, peft_model, tiny_bert, tuned_params  # noqa: E402
from saved_files import decoded_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def launch(scenario: str, tmp_path: Path) -> list[Path]:
    """Run both ranks of a scenario; returns the path each rank saved to."""
    outs = [tmp_path / f"{scenario}{r}.pt" for r in range(2)]
    run_two_ranks(lambda rank, port: [w.__file__, scenario, str(rank), port, str(outs[rank]), str(tmp_path)])
    return outs


def one_process(base, batches, kind: str, allocation: str, clip, dtype: str):
    model = peft_model(base, allocation=allocation)
    sam_peft.select_parameters(model, batches, dropout=False, progress=False, selection=kind, max_grad_norm=clip,
                               statistics_dtype=dtype)
    return model, sam_peft.selected_indices(model)


@pytest.fixture(scope="module")
def base():
    return tiny_bert()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of both ranks running the FSDP and the DDP scenarios: {scenario: [rank 0, rank 1 results]}."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    outs = launch("all", tmp_path)
    return tmp_path, {s: [torch.load(f"{out}.{s}", weights_only=False) for out in outs] for s in ("fsdp", "ddp")}


# --------------------------------------------------------------------------- FSDP2


def test_fsdp_selection_training_save_and_load(base, two_ranks):
    tmp_path, results = two_ranks[0], two_ranks[1]["fsdp"]
    merged = w.step_batches(None)  # a burn-in step under FSDP is the gradient of both ranks' batches together
    for case in w.FSDP_CASES:
        _, single = one_process(base, merged, *case)
        for result in results:
            assert_same_indices(result["selected"][case], single)
    for allocation in ("global", "per_tensor"):  # embedding rows that do not split evenly over the ranks
        _, single = one_process(w.uneven_bert(), merged, "sam", allocation, None, "float32")
        for result in results:
            assert_same_indices(result["selected"][("uneven", allocation)], single)
    # and the shards matter: one rank's batches alone select something else
    _, alone = one_process(base, w.step_batches(0), "sam", "global", None, "float32")
    _, single = one_process(base, merged, "sam", "global", None, "float32")
    assert any(not torch.equal(alone[n], single[n]) for n in single)

    # the values train sharded: each rank holds about half of them
    r0, r1 = results
    assert r0["numel"] == r1["numel"] > 0
    assert r0["local_numel"] + r1["local_numel"] == r0["numel"]
    assert all(torch.equal(r0["values"][n], r1["values"][n]) for n in r0["values"])
    assert any(torch.count_nonzero(v) for v in r0["values"].values())
    # saved once, in full; loaded (and sharded again) it gives the same model
    saved = tmp_path / "saved" / "adapter_model.safetensors"
    stored = decoded_file(saved)
    assert sum(v.numel() for k, v in stored.items() if "sparsediff_values" in k) == r0["numel"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "saved"))
    assert_same_indices(sam_peft.selected_indices(loaded), r0["loaded_selected"])
    for result in results:
        torch.testing.assert_close(result["loaded_logits"], result["logits"])
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**make_batches(1, seed=9)[0]).logits, r0["logits"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- DDP and the Trainer


def test_ddp_options_and_trainer_with_both_allocations(base, two_ranks):
    results = two_ranks[1]["ddp"]
    for case in w.DDP_CASES:
        model, single = one_process(base, make_batches(4, seed=7), *case)  # DDP: the same batches, one by one
        for result in results:
            assert_same_indices(result["selected"][case], single)
        torch.testing.assert_close(results[0]["grads"][case], results[1]["grads"][case])
    for allocation in ("global", "per_tensor"):
        r0, r1 = (r["trainer"][allocation] for r in results)
        assert r0["ddp"] and r1["ddp"]
        assert_same_indices(r0["selected"], r1["selected"])
        assert any(torch.count_nonzero(v) for v in r0["values"].values())
        for name in r0["values"]:
            torch.testing.assert_close(r0["values"][name], r1["values"][name])


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("seed", range(4))
def test_sharded_topk_equals_one_process_topk(seed):
    """The radix select over shards gives the one-process set, ties included (one process: one shard each)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(0, 5, (n,), generator=g).float() * (seed + 1) for n in (7, 130, 1, 64)]
    tensors[1][:10] = -0.0  # -0.0 and 0.0 tie
    named = [(str(i), x) for i, x in enumerate(tensors)]
    for k in (0, 1, 5, 37, 100, sum(x.numel() for x in tensors)):
        expected = top_entries(named, Budget((0,) * len(tensors), (k,)))
        got = radix_select([Shard(x, 0, x.numel()) for x in tensors], Budget((0,) * len(tensors), (k,)))
        assert all(torch.equal(got[i], expected[str(i)]) for i in range(len(tensors)))
    counts = {str(i): x.numel() // 3 for i, x in enumerate(tensors)}
    per_tensor = Budget(tuple(range(len(tensors))), tuple(counts.values()))
    expected = top_entries(named, per_tensor)
    got = radix_select([Shard(x, 0, x.numel()) for x in tensors], per_tensor)
    assert all(torch.equal(got[i], expected[str(i)]) for i in range(len(tensors)))


def test_clipping_and_bf16_statistics_in_one_process(base):
    batches = make_batches(3, seed=7)
    _, plain = one_process(base, batches, "sam", "global", None, "float32")
    _, unclipped = one_process(base, batches, "sam", "global", 1e9, "float32")  # a norm never reached
    assert_same_indices(unclipped, plain)
    _, clipped = one_process(base, batches, "sam", "global", 1e-3, "float32")
    assert any(not torch.equal(clipped[n], plain[n]) for n in plain)  # the clipped sum weights batches equally
    _, half = one_process(base, batches, "sam", "per_tensor", None, torch.bfloat16)
    _, full = one_process(base, batches, "sam", "per_tensor", None, torch.float32)
    same = sum(int(torch.isin(half[n], full[n]).sum()) for n in full)
    assert same >= 0.9 * sum(v.numel() for v in full.values())
    with pytest.raises(sam_peft.ConfigError, match="statistics_dtype"):
        one_process(base, batches, "sam", "global", None, "float16")
    with pytest.raises(sam_peft.ConfigError, match="max_grad_norm"):
        one_process(base, batches, "sam", "global", -1.0, "float32")


def test_deepspeed_zero3_is_refused_with_a_pointer_to_fsdp(base):
    model = peft_model(base)
    for p in model.parameters():  # what ZeRO-3 leaves on a partitioned parameter
        p.ds_id, p.ds_numel = 0, p.numel()
    with pytest.raises(sam_peft.SelectionError, match="ZeRO-3.*FSDP"):
        sam_peft.select_parameters(model, make_batches(1), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_selection_on_one_gpu(base, tmp_path):
    """FSDP2 on a one-rank NCCL group on the GPU: the same indices as one process on the CPU."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    batches = make_batches(2, seed=7)
    _, single = one_process(base, batches, "sam", "global", 1.0, "float32")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        model = peft_model(base, allocation="global").cuda()
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        sam_peft.select_parameters(model, batches, dropout=False, progress=False, max_grad_norm=1.0)
        gpu = sam_peft.selected_indices(model)
        model(**{k: v.cuda() for k, v in batches[0].items()}).loss.backward()
    finally:
        dist.destroy_process_group()
    same = sum(int(torch.isin(gpu[n], single[n]).sum()) for n in single)
    assert same >= 0.99 * sum(v.numel() for v in single.values())  # GPU kernels round differently at near-ties


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_with_accelerate_fsdp2_on_gpu(base, tmp_path):
    """Trainer + accelerate's FSDP2 plugin (torchrun, one process per GPU) + SAMCallback with global allocation."""
    n = min(torch.cuda.device_count(), 2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "trainer.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
         w.__file__, "trainer_fsdp", "0", "0", str(out), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = torch.load(out, weights_only=False)
    k = sum(i.numel() for i in result["selected"].values())
    assert k == result["k"] == sam_peft.ranking.budget.entry_budget(0.02, sum(
        p.numel() for _, p in tuned_params(base)))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fsdp-trainer-saved"))
    assert_same_indices(sam_peft.selected_indices(loaded), result["selected"])
    assert any(torch.count_nonzero(v) for v in result["values"].values())
