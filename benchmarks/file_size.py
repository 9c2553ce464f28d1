"""Bytes per tuned entry of saved adapters on the packaged MiniLM: format 1, format 2 with float32 values, format 2
with bfloat16 values (docs/format.md).

Bytes per entry = size of the whole adapter_model.safetensors (header, metadata, checksums and the 2-label head
included) / number of tuned entries. The adapters are built at p = 0.005 with the data-free selections
("magnitude", "random"; their values set to seeded N(0, 1e-3) numbers, as after training), plus any trained adapter
given with --adapter. Format 1 is written as sam-peft wrote it before format 2 (peft's state dict: int32 indices,
float32 values per tensor, the same header metadata, version 1). Every format-2 file is loaded back and checked: the
indices and float32 values bit-identical, bfloat16 values equal to the float32 ones rounded once.

    OMP_NUM_THREADS=1 python benchmarks/file_size.py [--adapter RUN_OR_ADAPTER_DIR ...] [--json OUT.json]
        [--write-bfloat16 OUT_DIR]   # also write the (last) --adapter with bfloat16 values, to evaluate it
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

MODEL_FILE = "adapter_model.safetensors"


def base_model(num_labels: int = 2):
    from transformers import AutoModelForSequenceClassification

    from sam_peft.training import default_model_path

    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=num_labels)


def built(selection: str, sparsity: float):
    """A MiniLM adapter with a data-free selection and seeded non-zero values."""
    from peft import get_peft_model

    import sam_peft

    model = get_peft_model(base_model(), sam_peft.SparseDiffConfig(task_type="SEQ_CLS", sparsity=sparsity,
                                                                   selection=selection))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sparsediff_values." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 1e-3)
    return model


def loaded(adapter: Path):
    """A trained adapter (the `adapter/` of a `sam-peft train` run, or an adapter directory) on the packaged base."""
    from peft import PeftModel

    from sam_peft.deltas.adapter_dir import delta_from_adapter_dir, resolve_adapter_dir

    directory = resolve_adapter_dir(adapter)
    head = delta_from_adapter_dir(directory).dense["classifier.weight"]
    return PeftModel.from_pretrained(base_model(head.shape[0]), directory)


def write_format1(model, path: Path) -> None:
    """The adapter file as sam-peft wrote it in format 1."""
    from peft import get_peft_model_state_dict

    from sam_peft.storage.identity import identity_metadata
    from sam_peft.storage.io import save_safetensors_atomic

    tensors = get_peft_model_state_dict(model)
    assert all(t.dtype == torch.int32 for k, t in tensors.items() if ".sparsediff_indices." in k)
    config = model.peft_config["default"]
    metadata = {"format": "pt", **identity_metadata(config), "sam_peft_format": "1",
                "counts": json.dumps(config.counts, sort_keys=True)}  # format 1 repeated the counts here
    save_safetensors_atomic(tensors, path / MODEL_FILE, metadata=metadata)


def file_content(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def check_round_trip(model, directory: Path, values_dtype: str) -> None:
    """The adapter saved in `directory` loads back bit-identical (values rounded once for half precision)."""
    from peft import PeftModel

    num_labels = model.base_model.model.classifier.modules_to_save["default"].out_features
    back = file_content(PeftModel.from_pretrained(base_model(num_labels), directory))
    expected = file_content(model)
    assert back.keys() == expected.keys()
    for key, tensor in expected.items():
        if ".sparsediff_values." in key and values_dtype != "float32":
            tensor = tensor.to(getattr(torch, values_dtype)).float()
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def measure(label: str, model, root: Path, write_bfloat16: Path | None = None) -> dict:
    config = model.peft_config["default"]
    entries = sum(config.counts.values())
    row = {"adapter": label, "entries": entries}
    old = root / f"{label}-format1"
    old.mkdir(parents=True)
    write_format1(model, old)
    row["format 1"] = (old / MODEL_FILE).stat().st_size / entries
    for values_dtype in ("float32", "bfloat16"):
        config.values_dtype = values_dtype
        directory = root / f"{label}-{values_dtype}"
        model.save_pretrained(directory)
        check_round_trip(model, directory, values_dtype)
        row[f"format 2 {values_dtype}"] = (directory / MODEL_FILE).stat().st_size / entries
        if values_dtype == "bfloat16" and write_bfloat16 is not None:
            model.save_pretrained(write_bfloat16)
    config.values_dtype = "float32"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.005)
    parser.add_argument("--adapter", action="append", default=[], help="a trained adapter (repeatable)")
    parser.add_argument("--write-bfloat16", type=Path, help="write the last --adapter with bfloat16 values here")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for selection in ("magnitude", "random"):
            rows.append(measure(f"{selection} p={args.sparsity:g}", built(selection, args.sparsity), root))
        for i, adapter in enumerate(args.adapter):
            last = i == len(args.adapter) - 1
            rows.append(measure(f"trained {i}", loaded(Path(adapter)), root,
                                args.write_bfloat16 if last else None))
    columns = ["adapter", "entries", "format 1", "format 2 float32", "format 2 bfloat16"]
    print("bytes per tuned entry (whole adapter_model.safetensors / entries); round trips checked")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else f"{row[c]:,}" if isinstance(row[c], int)
                         else row[c] for c in columns))
    for i, adapter in enumerate(args.adapter):
        print(f"trained {i}: {adapter}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
