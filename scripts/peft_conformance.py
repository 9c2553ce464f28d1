#!/usr/bin/env python
"""peft conformance: run the installed peft's own custom-model test suite with sam-peft rows added.

    python scripts/peft_conformance.py            # download (cached), patch, run; exit status of pytest
    python scripts/peft_conformance.py --all      # also run the deselected deviations (they fail)
    python scripts/peft_conformance.py -k merge -- -x --tb=short   # some tests; pytest arguments after --

Steps: `pip download --no-deps --no-binary :all: peft==<installed version>` into a git-ignored cache folder
(`.peft-conformance/` at the repository root), extract `tests/test_custom_models.py` and the helpers it imports
(`testing_common.py`, `testing_utils.py`) into a package there, add `SparseDiffConfig` rows to its `TEST_CASES`
(every layer kind the tuner wraps in those models, every data-free selection and both allocations), import
`sam_peft` first (a conftest), and run the file's tests of those rows with pytest. The deliberate deviations,
each with its reason, are listed in docs/conformance.md and deselected here by node id (`DEVIATIONS`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELPERS = ("testing_common.py", "testing_utils.py")
TEST_FILE = "test_custom_models.py"
PACKAGE = "peft_tests"
ROW_MARK = "SparseDiff"

# The rows added to TEST_CASES: (test name, model id of the file's MockTransformerWrapper, config class, kwargs).
# Sparsities are large because the models are tiny (an MLP layer of 10 x 20), and large enough that a selected entry
# of each trained tensor has a non-zero gradient on the tests' inputs (with 1 or 2 entries per tensor, all of them can
# sit in a ReLU unit that is dead for every input; such entries cannot move, whatever the tuner does).
ROWS = """
SPARSEDIFF_TEST_CASES = [
    ("Vanilla MLP 1 SparseDiff", "MLP", SparseDiffConfig, {"target_modules": "lin0", "sparsity": 0.1}),
    ("Vanilla MLP 2 SparseDiff", "MLP", SparseDiffConfig, {"target_modules": ["lin0", "lin1"], "sparsity": 0.1}),
    ("Vanilla MLP 3 SparseDiff", "MLP", SparseDiffConfig,
     {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "sparsity": 0.1}),
    ("Vanilla MLP 4 SparseDiff default targets", "MLP", SparseDiffConfig, {"sparsity": 0.1}),
    ("Vanilla MLP 5 SparseDiff global", "MLP", SparseDiffConfig, {"sparsity": 0.1, "allocation": "global"}),
    ("Vanilla MLP 6 SparseDiff random", "MLP", SparseDiffConfig, {"sparsity": 0.2, "selection": "random"}),
    ("Vanilla MLP 7 SparseDiff random global", "MLP", SparseDiffConfig,
     {"sparsity": 0.2, "selection": "random", "allocation": "global"}),
    ("Vanilla MLP 8 SparseDiff bitfit", "MLP", SparseDiffConfig, {"selection": "bitfit"}),
    ("MLP LayerNorm 1 SparseDiff", "MLP_LayerNorm", SparseDiffConfig, {"sparsity": 0.2}),
    ("MLP LayerNorm 2 SparseDiff", "MLP_LayerNorm", SparseDiffConfig,
     {"target_modules": ["layernorm0", "layernorm1"], "sparsity": 0.3, "selection": "random"}),
    ("Embedding + transformers Conv1D 1 SparseDiff", "EmbConv1D", SparseDiffConfig,
     {"target_modules": ["emb", "conv1d"], "sparsity": 0.1}),
    ("Embedding + transformers Conv1D 2 SparseDiff", "EmbConv1D", SparseDiffConfig,
     {"sparsity": 0.1, "selection": "random", "allocation": "global"}),
    ("Conv1d 1 SparseDiff", "Conv1d", SparseDiffConfig, {"target_modules": ["conv1d"], "sparsity": 0.5}),
    ("Conv1d 2 SparseDiff", "Conv1dBigger", SparseDiffConfig, {"sparsity": 0.05}),
    ("Conv2d 1 SparseDiff", "Conv2d", SparseDiffConfig, {"target_modules": ["conv2d"], "sparsity": 0.3}),
    ("Conv2d 2 SparseDiff", "Conv2d", SparseDiffConfig, {"sparsity": 0.1, "selection": "bitfit"}),
    ("MHA 1 SparseDiff", "MHA", SparseDiffConfig, {"target_modules": ["mha"], "sparsity": 0.1, "selection": "random"}),
    ("MHA 2 SparseDiff", "MHA", SparseDiffConfig, {"sparsity": 0.1}),
    ("MlpUsingParameters SparseDiff", "MlpUsingParameters", SparseDiffConfig, {"sparsity": 0.3}),
]
TEST_CASES += SPARSEDIFF_TEST_CASES
"""

# Deliberate deviations, deselected by node id: (node id or its prefix up to the row name, reason); a trailing "*"
# matches any rest of the id (the parameter ids, whose numbering depends on peft's own rows). docs/conformance.md
# lists the same with more detail. Deviation 1 (an adapter on a base with other weights) is not deselected: the run
# sets SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH=1, the documented override.
_NODE = "peft_tests/test_custom_models.py::TestPeftCustomModel::"
_FP32_VALUES = ("sam-peft keeps the delta values in float32 (the master copy) whatever autocast_adapter_dtype says; "
                "with autocast_adapter_dtype=False peft expects fp16/bf16 adapter weights on a fp16/bf16 base")
DEVIATIONS: list[tuple[str, str]] = [
    *[(f"{_NODE}test_adapter_dtype_autocast[{low_cpu}-False-{dtype}-*", _FP32_VALUES)
      for low_cpu in ("False", "True") for dtype in ("dtype0", "dtype1")],
    (f"{_NODE}test_only_params_are_updated[MHA 2 SparseDiff-*",
     "magnitude selection keeps the query part of MultiheadAttention's zero-initialised in_proj_bias (ties go to the "
     "lowest index); on the test's saturated attention their gradient is ~1e-10, so after 3 SGD steps at lr 1e-3 "
     "they move by ~1e-13, below the test's 1e-4 tolerance"),
]

CONFTEST = '''"""Written by scripts/peft_conformance.py: sam-peft is imported before peft's tests (it registers it)."""
import json
import pathlib
import sys
import types

import sam_peft  # noqa: F401

DESELECT = json.loads(pathlib.Path(__file__).with_name("deselect.json").read_text())


def pytest_collection_modifyitems(config, items):
    """Deselect the documented deviations (scripts/peft_conformance.py DEVIATIONS, docs/conformance.md)."""
    def deviates(nodeid):
        return "SparseDiff" in nodeid and any(
            nodeid == pattern or (pattern.endswith("*") and nodeid.startswith(pattern[:-1])) for pattern in DESELECT)

    deselected = [item for item in items if deviates(item.nodeid)]
    pathlib.Path(__file__).with_name("deselected.txt").write_text("".join(f"{i.nodeid}\\n" for i in deselected))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not deviates(item.nodeid)]


try:  # testing_common imports diffusers only for an isinstance check on pipelines
    import diffusers  # noqa: F401
except ImportError:
    stub = types.ModuleType("diffusers")
    stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = stub
'''

PYTEST_INI = """[pytest]
addopts = --disable-warnings -rfE
filterwarnings =
    ignore::DeprecationWarning
    ignore::FutureWarning
"""


def download(peft_version: str, cache: Path) -> Path:
    """The peft sdist in the cache (downloaded with pip when missing)."""
    sdist = cache / f"peft-{peft_version}.tar.gz"
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"peft=={peft_version}", "-d", str(cache)], check=True)
    if not sdist.exists():
        raise SystemExit(f"pip did not write {sdist}")
    return sdist


def prepare(sdist: Path, run_dir: Path) -> Path:
    """Extract the test file and its helpers into `run_dir/peft_tests/`, patched with the sam-peft rows."""
    package = run_dir / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if Path(m.name).parent.name == "tests"}
        for name in (TEST_FILE, *HELPERS):
            if name not in members:
                raise SystemExit(f"{sdist.name} has no tests/{name}")
            (package / name).write_bytes(tar.extractfile(members[name]).read())
    source = (package / TEST_FILE).read_text()
    marker = "\nALL_PEFT_CONFIG_CLASSES = "
    if "\nTEST_CASES = [" not in source or marker not in source:
        raise SystemExit(f"{TEST_FILE} of this peft has no TEST_CASES list followed by ALL_PEFT_CONFIG_CLASSES")
    source = source.replace(marker, "\n" + ROWS + marker, 1)
    source = re.sub(r"^from peft import \(", "from sam_peft import SparseDiffConfig\nfrom peft import (",
                    source, count=1, flags=re.M)
    (package / TEST_FILE).write_text(source)
    (package / "__init__.py").write_text("")
    (run_dir / "conftest.py").write_text(CONFTEST)
    (run_dir / "deselect.json").write_text("[]")
    (run_dir / "pytest.ini").write_text(PYTEST_INI)
    return package / TEST_FILE


def counts_from_junit(path: Path) -> tuple[Counter, list[str]]:
    counts, failed = Counter(), []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
        if outcome == "failed":
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failed


def deselected_count(run_dir: Path) -> int:
    path = run_dir / "deselected.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(ROOT / ".peft-conformance"), help="download and run folder")
    parser.add_argument("--all", action="store_true", help="do not deselect the documented deviations")
    parser.add_argument("-k", dest="keyword", help="only the tests matching this pytest -k expression (within the "
                                                   "sam-peft rows)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    peft_version = version("peft")
    cache = Path(args.cache).resolve()
    run_dir = cache / f"run-{peft_version}"
    test_file = prepare(download(peft_version, cache), run_dir)
    junit = run_dir / "junit.xml"
    keyword = ROW_MARK if not args.keyword else f"{ROW_MARK} and ({args.keyword})"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", keyword,
               f"--junitxml={junit}", str(test_file.relative_to(run_dir))]
    deselect = [] if args.all else [pattern for pattern, _ in DEVIATIONS]
    (run_dir / "deselect.json").write_text(json.dumps(deselect, indent=1))
    (run_dir / "deselected.txt").unlink(missing_ok=True)
    junit.unlink(missing_ok=True)
    command += args.pytest_args
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Deviation 1 (docs/conformance.md): sam-peft refuses an adapter on a base with other weights; some of peft's
    # tests load an adapter on a freshly initialised base, so the run sets the documented override.
    env = dict(os.environ, PYTHONPATH=pythonpath, SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH="1")
    print(f"peft {peft_version}: {' '.join(command[1:])} (in {run_dir})", flush=True)
    started = time.perf_counter()
    rc = subprocess.run(command, cwd=run_dir, env=env).returncode
    seconds = time.perf_counter() - started
    if junit.exists():
        counts, failed = counts_from_junit(junit)
        by_test = Counter(f.split("::")[-1].split("[")[0] for f in failed)
        print(f"\npeft {peft_version} conformance: {counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['skipped']} skipped, {deselected_count(run_dir)} deselected as documented deviations "
              f"(docs/conformance.md), {seconds:.0f} s")
        for name, n in by_test.most_common():
            print(f"  failed {n:>3}  {name}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
