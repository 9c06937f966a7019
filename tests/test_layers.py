"""The package's layering, checked statically: every ``import`` in ``kdkernels/`` and ``bench/`` is
parsed with ``ast`` (those inside functions too); nothing here imports kdkernels.

Fails on (a) an import cycle among the modules, (b) an import from a lower layer to a higher one
(or one the rules of a layer forbid), (c) a private name (``_x``) imported from another package's
module (``kdkernels._core`` and ``kdkernels._C`` excepted), and on modules the table below does not
place, imports of modules that do not exist, and modules longer than ``MAX_LINES``.
"""

from __future__ import annotations

import ast
import fnmatch
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdkernels", "bench")  # the top-level packages walked; other imports are ignored
MAX_LINES = 600                    # per module under kdkernels/

FAMILIES = "<families>"  # every public kdkernels/<name>.py not in NOT_FAMILIES (found by listing the directory)
NOT_FAMILIES = {"__init__", "__main__", "nn", "cli", "reference"}

# lowest first; a module may import from its own layer or lower ones.  "x.*" is x and everything under it.
LAYERS: List[Tuple[str, List[str]]] = [
    ("L0 reference/core", ["kdkernels.reference", "kdkernels._core.*", "kdkernels._C"]),
    ("L1 triton",         ["kdkernels.triton.*"]),
    ("L2 families",       [FAMILIES]),
    ("L3 api",            ["kdkernels", "kdkernels.nn", "kdkernels.compat.*", "kdkernels.distributed.*",
                           "kdkernels.integrations.*"]),
    ("L4 apps",           ["kdkernels.train.*", "kdkernels.__main__", "kdkernels.cli", "bench.*"]),
]
# the one rule inside a layer: kdkernels.triton.* may import kdkernels.triton._common but not each other
TRITON = "kdkernels.triton"
TRITON_SHARED = "kdkernels.triton._common"
TRITON_ANY = {"kdkernels.triton.aot"}  # may import any kdkernels.triton.*
NOTHING_FROM_KDKERNELS = {"kdkernels.reference"}
# private names of anyone may be imported from these
PRIVATE_OK = ["kdkernels._core.*", "kdkernels._C"]
# may take only public names from the families and from kdkernels (kdkernels._core stays allowed)
PUBLIC_ONLY = ["kdkernels.train.*", "bench.*", "kdkernels.compat.*", "kdkernels.distributed.*", "kdkernels.nn"]
# compiled extensions: no .py file, and absent from a tree that was never built
EXTENSIONS = {"kdkernels._C"}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    names: Tuple[str, ...]  # the names a `from ... import` takes from `imported` (empty: the module itself)
    private: Tuple[str, ...]  # the private names (or private module components) this import reaches
    top_level: bool


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    return fnmatch.fnmatchcase(module, pattern)


def _any(module: str, patterns: Iterable[str]) -> bool:
    return any(_matches(module, p) for p in patterns)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def discover(root: Path, packages: Iterable[str] = PACKAGES) -> Dict[str, Tuple[Path, bool]]:
    """module name -> (file, is_package); a directory holding modules is a package even without __init__."""
    modules: Dict[str, Tuple[Path, bool]] = {}
    for pkg in packages:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                modules[".".join(parts[:-1])] = (path, True)
            else:
                modules[".".join(parts)] = (path, False)
            for i in range(1, len(parts)):  # namespace packages on the way
                modules.setdefault(".".join(parts[:i]), (root.joinpath(*parts[:i]), True))
    return modules


def package_of(module: str, modules: Dict[str, Tuple[Path, bool]]) -> str:
    if module in modules and modules[module][1]:
        return module
    return module.rpartition(".")[0]


def parse_edges(root: Path, modules: Dict[str, Tuple[Path, bool]],
                packages: Iterable[str] = PACKAGES) -> Tuple[List[Edge], Dict[str, int]]:
    packages = tuple(packages)
    known = set(modules) | EXTENSIONS
    edges: List[Edge] = []
    lines: Dict[str, int] = {}

    for module, (path, is_pkg) in sorted(modules.items()):
        if path.is_dir():
            continue
        source = path.read_text(encoding="utf-8")
        lines[module] = len(source.splitlines())
        tree = ast.parse(source, filename=str(path))
        top = {id(n) for n in tree.body}
        here = module if is_pkg else module.rpartition(".")[0]

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] not in packages:
                        continue
                    parts = alias.name.split(".")
                    private = tuple(p for p in parts if _is_private(p))
                    edges.append(Edge(module, alias.name, node.lineno, (), private, id(node) in top))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")
                    if node.level > 1:
                        base_parts = base_parts[:-(node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] not in packages:
                    continue
                base_private = tuple(p for p in base.split(".") if _is_private(p))
                plain = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if alias.name != "*" and sub in known:  # `from pkg import mod`: an edge to the module
                        priv = base_private + ((alias.name,) if _is_private(alias.name) else ())
                        edges.append(Edge(module, sub, node.lineno, (), priv, id(node) in top))
                    else:
                        plain.append(alias.name)
                if plain:
                    priv = base_private + tuple(n for n in plain if _is_private(n))
                    edges.append(Edge(module, base, node.lineno, tuple(plain), priv, id(node) in top))
    return [e for e in edges if e.imported != e.importer], lines


class Layers:
    def __init__(self, root: Path, modules: Dict[str, Tuple[Path, bool]], table=LAYERS):
        pkg_dir = root / "kdkernels"
        self.families: Set[str] = set()
        if pkg_dir.is_dir():
            self.families = {f"kdkernels.{p.stem}" for p in pkg_dir.glob("*.py")
                             if p.stem not in NOT_FAMILIES and not p.stem.startswith("_")}
        self.table = table
        self.modules = modules

    def of(self, module: str) -> Optional[int]:
        for i, (_, patterns) in enumerate(self.table):
            for p in patterns:
                if (p == FAMILIES and module in self.families) or (p != FAMILIES and _matches(module, p)):
                    return i
        return None

    def name(self, i: int) -> str:
        return self.table[i][0]


def check_layers(root: Path, packages: Iterable[str] = PACKAGES) -> List[str]:
    """Every violation of the rules above (cycles included), as 'importer -> imported (line N): reason'."""
    modules = discover(root, packages)
    edges, _ = parse_edges(root, modules, packages)
    layers = Layers(root, modules)
    known = set(modules) | EXTENSIONS
    out: List[str] = []

    for module in sorted(modules):
        if module.split(".")[0] == "kdkernels" and layers.of(module) is None:
            out.append(f"{module}: not in the layer table")

    for e in edges:
        reasons = []
        if e.imported not in known:
            reasons.append("no such module")
        li, lt = layers.of(e.importer), layers.of(e.imported)
        if e.importer in NOTHING_FROM_KDKERNELS and e.imported.split(".")[0] == "kdkernels":
            reasons.append(f"{e.importer} may import nothing from kdkernels")
        elif li is not None and lt is not None:
            if lt > li:
                from_pkg = e.names and e.imported in modules and modules[e.imported][1]
                what = f" ({', '.join(e.names)})" if from_pkg else ""
                reasons.append(f"upward: {layers.name(li)} imports {layers.name(lt)}{what}")
            elif (li == lt and _matches(e.importer, TRITON + ".*") and e.importer != TRITON
                  and e.importer not in TRITON_ANY and e.imported != TRITON_SHARED):
                reasons.append(f"{TRITON}.* may import only {TRITON_SHARED} from {TRITON}")
        if e.private and not _any(e.imported, PRIVATE_OK):
            names = ", ".join(e.private)
            target_is_api = e.imported in layers.families or e.imported == "kdkernels"
            if package_of(e.importer, modules) != package_of(e.imported, modules):
                reasons.append(f"private {names} from another package")
            elif _any(e.importer, PUBLIC_ONLY) and target_is_api:
                reasons.append(f"private {names}: {e.importer} may use only public names of families and kdkernels")
        for r in reasons:
            out.append(f"{e.importer} -> {e.imported} (line {e.line}): {r}")

    for cycle in import_cycles(edges, modules):
        out.append("cycle: " + str(cycle))
    return out


def import_cycles(edges: List[Edge], modules: Dict[str, Tuple[Path, bool]]) -> List[List[str]]:
    """Strongly connected components (size > 1) of the module graph, function-level imports included,
    without the edges from a package's __init__ to the modules under it."""
    graph: Dict[str, Set[str]] = defaultdict(set)
    for e in edges:
        if e.imported not in modules:
            continue
        if modules.get(e.importer, (None, False))[1] and e.imported.startswith(e.importer + "."):
            continue
        graph[e.importer].add(e.imported)

    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    sccs: List[List[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan, iterative over the successors
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    sccs.append(sorted(comp))

    for v in sorted(list(graph)):
        if v not in index:
            strongconnect(v)
    return sorted(sccs)


def long_modules(root: Path, limit: int = MAX_LINES) -> List[str]:
    modules = discover(root, ("kdkernels",))
    _, lines = parse_edges(root, modules, ("kdkernels",))
    return [f"{m}: {n} lines" for m, n in sorted(lines.items()) if n > limit]


def test_layers():
    violations = check_layers(ROOT)
    assert not violations, f"{len(violations)} layering violations:\n" + "\n".join(violations)


def test_module_length():
    offenders = long_modules(ROOT)
    assert not offenders, f"modules over {MAX_LINES} lines:\n" + "\n".join(offenders)


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_checker_on_a_synthetic_tree(tmp_path):
    _write(tmp_path, {
        "kdkernels/__init__.py": "from kdkernels import nn, alpha\nfrom kdkernels.alpha import _ok_for_init\n",
        "kdkernels/reference.py": "import torch\nfrom kdkernels._core import rows\n",
        "kdkernels/_core/rows.py": "def _helper(): pass\n",
        "kdkernels/_core/ext.py": "from kdkernels import _C\n",
        "kdkernels/triton/__init__.py": "",
        "kdkernels/triton/_common.py": "",
        "kdkernels/triton/a.py": "from kdkernels.triton import _common\nfrom kdkernels.triton.b import _k\n",
        "kdkernels/triton/b.py": "from kdkernels._core.rows import _helper\n",
        "kdkernels/triton/aot.py": "from kdkernels.triton import a, b\n",
        "kdkernels/alpha.py": "import kdkernels.beta\nfrom . import _private_mod\n",
        "kdkernels/beta.py": "def f():\n    from kdkernels.alpha import _x\n",  # function level closes the cycle
        "kdkernels/_private_mod.py": "",
        "kdkernels/gamma.py": "def f():\n    from kdkernels.nn import Loss\n",  # upward, inside a function
        "kdkernels/nn.py": "from kdkernels.alpha import _x\nfrom kdkernels.missing import y\n",
        "kdkernels/train/__init__.py": "from kdkernels.train import loop\n",
        "kdkernels/train/loop.py": "from kdkernels.train import _util\nfrom ..alpha import _y\nimport kdkernels\n",
        "kdkernels/train/_util.py": "",
        "kdkernels/ops/x.py": "",
        "bench/__init__.py": "",
        "bench/b.py": "from bench import _memprobe\nfrom kdkernels.functional import public\n",
        "bench/_memprobe.py": "",
    })
    got = check_layers(tmp_path)
    text = "\n".join(got)
    expected = [
        "cycle: ['kdkernels.alpha', 'kdkernels.beta']",
        "kdkernels.gamma -> kdkernels.nn (line 2): upward: L2 families imports L3 api",
        "kdkernels.reference -> kdkernels._core.rows (line 2): kdkernels.reference may import nothing from kdkernels",
        "kdkernels.triton.a -> kdkernels.triton.b (line 2): kdkernels.triton.* may import only kdkernels.triton._co",
        "kdkernels.nn -> kdkernels.alpha (line 1): private _x: kdkernels.nn may use only public names",
        "kdkernels.nn -> kdkernels.missing (line 2): no such module",
        "kdkernels.train.loop -> kdkernels.alpha (line 2): private _y from another package",
        "kdkernels.ops.x: not in the layer table",
        "kdkernels.ops: not in the layer table",
        "kdkernels._private_mod: not in the layer table",
        "bench.b -> kdkernels.functional (line 2): no such module",
    ]
    for line in expected:
        assert any(g.startswith(line) for g in got), f"missing {line!r} in:\n{text}"
    # allowed: _core privates, _C from _core, triton._common, aot, a package's own privates,
    # kdkernels' __init__ importing its submodules (no cycle through it), families sharing privates
    for allowed in ["kdkernels.triton.b ->", "kdkernels.triton.aot ->", "kdkernels._core.ext ->",
                    "kdkernels.train.loop -> kdkernels.train._util", "kdkernels.train.loop -> kdkernels (",
                    "kdkernels.alpha -> kdkernels._private_mod", "kdkernels.beta ->", "kdkernels ->",
                    "bench.b -> bench._memprobe", "kdkernels.triton.a -> kdkernels.triton._common"]:
        assert not any(g.startswith(allowed) for g in got), f"unexpected {allowed!r} in:\n{text}"
    assert len(got) == len(expected), text

    _write(tmp_path, {"kdkernels/big.py": "x = 1\n" * (MAX_LINES + 1)})
    assert long_modules(tmp_path) == [f"kdkernels.big: {MAX_LINES + 1} lines"]
