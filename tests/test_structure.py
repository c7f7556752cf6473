"""The package's structure: every walk over a model's stages goes through the one helper
(``eeruntime.state.stage_forward``), and the modules' imports form no cycle."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import eeruntime as ee
import eeruntime.state as state_mod

PKG = Path(ee.__file__).parent


class Counted(nn.Module):
    """A stage that counts its own calls."""

    calls = 0

    def __init__(self, d_in, d):
        super().__init__()
        self.lin = nn.Linear(d_in, d)

    def forward(self, x):
        Counted.calls += 1
        return torch.tanh(self.lin(x))


@pytest.fixture
def helper_calls(monkeypatch):
    """Every eeruntime module's ``stage_forward`` replaced by one that counts its calls."""
    import eeruntime.calibration.cache  # noqa: F401  (loaded, so its name is patched too)
    import eeruntime.calibration.cost_source  # noqa: F401
    import eeruntime.oracle  # noqa: F401

    orig = state_mod.stage_forward
    seen = []

    def counted(stage, state):
        seen.append(stage)
        return orig(stage, state)

    patched = [
        name
        for name, mod in list(sys.modules.items())
        if name.startswith("eeruntime") and getattr(mod, "stage_forward", None) is orig
    ]
    for name in patched:
        monkeypatch.setattr(sys.modules[name], "stage_forward", counted)
    assert len(patched) >= 10, patched
    return seen


def model(K=3, d=6, C=4):
    return ee.MultiExitModel([Counted(d, d) for _ in range(K)], [nn.Linear(d, C) for _ in range(K)]).eval()


def walkers():
    """Each entry runs one walker of the stages on a fresh 3-stage model."""
    from eeruntime.calibration import build_cache
    from eeruntime.calibration.cost_source import measure_latency
    from eeruntime.oracle import oracle_forward, plain_forward, plan_oracle
    from eeruntime.runtime.graphs import GraphRunner

    x = torch.randn(12, 6)
    y = torch.randint(0, 4, (12,))

    def runtime(m, **kw):
        return ee.EERuntime(m, thresholds=0.3, criterion="max_prob", **kw)

    def run_stage(m):
        rt = runtime(m)
        res = rt.run_stage(0, x, torch.arange(12))
        if res.state is not None:
            rt.run_stage(1, res.state, res.rows, res.carry)

    def oracle(m):
        return oracle_forward(m, plan_oracle(x, torch.tensor([0, 1, 2] * 4), 3))

    return {
        "infer (fused CPU)": lambda m: runtime(m).infer(x),
        "infer (dispatched ops)": lambda m: runtime(m, decision_backend="torch").infer(x),
        "graph executor": lambda m: GraphRunner(runtime(m), buckets=(16,), capture=False).infer(x),
        "run_stage": run_stage,
        "model forward": lambda m: (m(x), m.forward_until(x, 1)),
        "plain_forward": lambda m: plain_forward(m, x),
        "oracle_forward": oracle,
        "cost model": lambda m: ee.measure_costs(m, x),
        "latency costs": lambda m: measure_latency(m, x, warmup=0, iters=1),
        "calibration pass": lambda m: build_cache(m, (x, y), "entropy", progress=False),
        "joint training": lambda m: ee.train.joint(m, [(x, y)], epochs=1, lr=1e-3, progress=False),
        "post-training": lambda m: ee.train.post_train(m, [(x, y)], epochs=1, lr=1e-3, progress=False),
        "differentiable training": lambda m: ee.train.differentiable(m, [(x, y)], epochs=1, lr=1e-3, progress=False),
        "two-stage training": lambda m: ee.train.two_stage(m, [(x, y)], epochs=1, lr=1e-3, progress=False),
        "learned-exit training": lambda m: ee.train.learned_exit(
            m, ee.exit_rules.LearnedExit(6), [(x, y)], epochs=1, lr=1e-3, progress=False
        ),
        "head equipping": lambda m: ee.train.add_gates(
            ee.MultiExitModel(list(m.stages), [nn.Sequential(nn.Linear(6, 4)) for _ in range(3)]), example=x
        ),
    }


@pytest.mark.parametrize("name", list(walkers()))
def test_every_walker_goes_through_the_stage_helper(name, helper_calls):
    m = model()
    fn = walkers()[name]
    Counted.calls = 0
    fn(m)
    stage_calls = Counted.calls
    ours = sum(isinstance(s, Counted) for s in helper_calls)
    assert stage_calls > 0
    assert ours == stage_calls, f"{name}: {stage_calls} stage calls, {ours} through stage_forward"


def test_attach_walks_the_backbone_through_the_helper(helper_calls):
    backbone = nn.Sequential(Counted(6, 6), Counted(6, 6), Counted(6, 6), nn.Linear(6, 4))
    Counted.calls = 0
    ee.attach_exits(backbone, at=["0", "1"], num_classes=4, example_input=torch.randn(2, 6))
    walked = sum(isinstance(s, Counted) for s in helper_calls)
    assert Counted.calls > 0 and walked > 0


# ------------------------------------------------------------------------------- imports
def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph():
    """Module -> the eeruntime modules it imports (anywhere in it, function bodies included)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_pkg, node)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub == "eeruntime._C":
                        continue  # the compiled extension (built or not): it imports nothing of ours
                    deps.add(sub if sub in files else target)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph):
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in graph}
    stack = []

    def visit(n):
        colour[n] = GREY
        stack.append(n)
        for m in sorted(graph[n]):
            if colour[m] == GREY:
                return stack[stack.index(m) :] + [m]
            if colour[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = BLACK
        return None

    for n in sorted(graph):
        if colour[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert "eeruntime.runtime.loop" in graph and "eeruntime.scoring" in graph

    # A submodule importing the package root would close a cycle through its front door when the
    # root imports it. The front ends (the command line and the serving code) import it (lazily,
    # as users do) and the root does not import them; every other module must not.
    def front_end(n):
        return n in ("eeruntime.cli", "eeruntime.__main__") or n.startswith("eeruntime.serve")

    importers = [n for n, d in graph.items() if "eeruntime" in d]
    assert [n for n in importers if not front_end(n)] == [], importers
    assert not set(importers) & graph["eeruntime"]  # (and not through others: the cycle check below)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ------------------------------------------------------------------------------- backend tables
def test_every_op_has_one_table_ending_with_its_reference():
    from importlib import import_module

    from eeruntime.ops import dispatch

    # (ee.ops.compact and friends are the functions; their modules are what holds the tables)
    compact_mod, exit_decision, exit_scatter = (
        import_module(f"eeruntime.ops.{m}") for m in ("compact", "exit_decision", "exit_scatter")
    )

    refs = {
        "compact": compact_mod.compact_ref,
        "compact_into": compact_mod.compact_into_ref,
        "compact_": compact_mod.compact_inplace_ref,
        "scatter_rows": compact_mod.scatter_rows_ref,
        "exit_decision": exit_decision.exit_decision_ref,
        "exit_scatter": exit_scatter.exit_scatter_ref,
    }
    for op, ref in refs.items():
        rows = dispatch._REGISTRY[op]
        assert rows[-1].name == "torch" and rows[-1].fn is ref, op
        assert len({b.name for b in rows}) == len(rows), op
    # Sync-free rows only: the extension's CUDA select/scatter and the Triton decision.
    assert dispatch.capturable_backends("compact_into") == ["cuda"] == dispatch.capturable_backends("scatter_rows")
    assert dispatch.capturable_backends("compact") == [] and dispatch.capturable_backends("exit_decision") == ["triton"]
    assert not hasattr(dispatch, "register")  # tables are declared, never patched in by imports


# ------------------------------------------------------------------------------- old import paths
def test_old_import_paths_name_the_moved_objects():
    """Modules that moved (runtime.py -> runtime/, graphs.py -> runtime/graphs.py, scorers.py ->
    eenet.py) keep their old import paths for users' code: the same objects, not copies."""
    import eeruntime.eenet as eenet
    import eeruntime.graphs as old_graphs
    import eeruntime.runtime as runtime
    import eeruntime.runtime.graphs as graphs
    import eeruntime.scorers as old_scorers

    for name in old_graphs.__all__:
        assert getattr(old_graphs, name) is getattr(graphs, name), name
    for name in old_scorers.__all__:
        assert getattr(old_scorers, name) is getattr(eenet, name), name
    assert runtime.EERuntime is ee.EERuntime and runtime.StageResult is ee.StageResult
    assert runtime.cat_rows is state_mod.cat_rows and runtime.take_rows is state_mod.take_rows
    assert ee.InferenceResult is runtime.InferenceResult
