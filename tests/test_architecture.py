"""The architecture holds: every package imports only the layers below it (the rank table), the core imports
nothing from the outer ring, no two modules import each other (no import cycle at all), and importing sam_peft
changes nothing for other peft methods."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sam_peft"
CORE = ("sam_peft.errors", "sam_peft.parallel", "sam_peft.storage", "sam_peft.ranking", "sam_peft.tuner",
        "sam_peft.burnin", "sam_peft.deltas")
# The layers, bottom up: a package may import its own modules and packages of a lower rank only (imports inside
# functions included). Packages of one rank are independent of each other.
RANKS = {
    "errors": 0,  # the exception hierarchy
    "parallel": 1,  # process groups, DTensor shards, DDP / FSDP2 internals
    "storage": 2,  # state-dict keys, base identity, validation, atomic safetensors I/O
    "ranking": 3,  # signals, budgets, exact top-k (local and across shards)
    "tuner": 4,  # the peft tuner: config, ops, layers, targets, model, registration
    "burnin": 5,  # select_parameters and SAMCallback
    "deltas": 5,  # SparseDelta, packing, adapter directories
    "baselines": 6,
    "tasks": 6,
    "plots": 6,
    "methods": 7,
    "evaluation": 7,
    "training": 8,
    "bench": 9,
    "cli": 10,
    "": 11,  # sam_peft/__init__.py: the public API
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> dict[str, set[str]]:
    """{module: sam_peft modules it imports (at any depth of its code)}."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = _resolve(module, path.name == "__init__.py", node)
            else:
                continue
            # a name imported from a package may be a submodule; keep the longest prefix that is a module
            for name in names:
                while name and name not in paths:
                    name = name.rpartition(".")[0]
                if name.startswith("sam_peft") and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def _is_core(module: str) -> bool:
    return module == "sam_peft.errors" or module.startswith(tuple(c + "." for c in CORE)) or module in CORE


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_rank():
    assert {_package(m) for m in import_graph()} == set(RANKS)


def test_packages_import_only_lower_layers():
    graph = import_graph()
    upward = sorted(f"{m} -> {e}" for m, edges in graph.items() for e in edges
                    if _package(e) != _package(m) and RANKS[_package(e)] >= RANKS[_package(m)])
    assert not upward, upward


def test_the_core_never_imports_the_outer_ring():
    graph = import_graph()
    bad = {m: sorted(e for e in edges if not _is_core(e) and e != "sam_peft")
           for m, edges in graph.items() if _is_core(m)}
    assert not {m: e for m, e in bad.items() if e}


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ importing its own submodules is how packages export: drop those edges
    edges = {m: {e for e in es if not e.startswith(m + ".")} for m, es in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for node in sorted(edges):
        if state.get(node) is None and visit(node, [node]):
            break
    assert not cycle, " -> ".join(cycle)


_LORA_SCRIPT = r"""
import hashlib, sys, torch
if sys.argv[1] == "with":
    import sam_peft  # noqa: F401
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64)).eval()

model = get_peft_model(bert(), LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False,
                                          task_type="SEQ_CLS"))
model.save_pretrained(sys.argv[2])
loaded = PeftModel.from_pretrained(bert(), sys.argv[2]).eval()
ids = torch.arange(12).reshape(2, 6) % 50
with torch.no_grad():
    out = loaded(input_ids=ids).logits
print(hashlib.sha256(open(sys.argv[2] + "/adapter_model.safetensors", "rb").read()).hexdigest())
print(open(sys.argv[2] + "/adapter_config.json").read().replace("\n", " "))
print(out.double().sum().item())
"""


def test_importing_sam_peft_changes_nothing_for_lora(tmp_path):
    results = {}
    for mode in ("without", "with"):
        # one hash seed for both: peft writes target_modules from a set, whose order depends on it
        done = subprocess.run([sys.executable, "-c", _LORA_SCRIPT, mode, str(tmp_path / mode)],
                              capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        results[mode] = done.stdout.splitlines()[-3:]
    assert results["with"] == results["without"]


def test_baseline_tuners_register_only_on_their_own_import():
    script = ("import sam_peft; from peft.utils import PeftType; print('BOTTLENECK' in PeftType.__members__); "
              "import sam_peft.baselines.adapters; print('BOTTLENECK' in PeftType.__members__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_importing_the_core_loads_no_harness():
    script = ("import sys, sam_peft; bad = [m for m in ('matplotlib', 'sam_peft.training', "
              "'sam_peft.bench', 'sam_peft.tasks') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
