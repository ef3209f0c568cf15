"""Instructions per step of the selective-scan kernels, counted in their SASS (no GPU needed).

``cuobjdump -sass`` lists each kernel's instructions. This module cuts a kernel into basic
blocks, finds its loops (natural loops of the control-flow graph) and counts the instructions
of one iteration along the *main path*: at every branch the side with more 128-bit vector
memory instructions (``LDG.E.128``, ``STG.E.128``, ``STS.128``, ``LDGSTS.E.BYPASS.128``: the
vector loads, stores and staging of aligned rows and whole tiles), then the side without a doubly
nested loop (the serial fallback of tiles whose steps may grow), then the one with more
``MUFU.EX2`` (softplus on, as in every exported model), then the shorter one; a nested loop is
counted separately. On the decaying path (softplus on, A <= 0) that is the path every tile of a
long, aligned sequence takes, so

    instructions per (channel, step) = (tile loop + N x state loop) / kItems

for the one-pass kernel (and pass 2), and tile loop / kItems for pass 1 (its states are
unrolled). ``tools/sass_steps.py`` prints them and the roofline model built on them
(docs/deploy.md).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field

#: A SASS instruction line of cuobjdump: /*addr*/ [@P] OPCODE operands ;
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
#: What the main path prefers at a branch.
VECTOR_OPS = ("LDG.E.128", "STG.E.128", "STS.128", "LDGSTS.E.BYPASS.128")
#: Steps per lane and tile (scan::kItems).
ITEMS = 16


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str
    op: str
    args: str


def parse_functions(sass: str) -> dict[str, list[Instr]]:
    """Function name -> its instructions, from ``cuobjdump -sass`` output (one architecture's
    functions: call it on one cubin or per ``code for sm_XX`` section)."""
    out: dict[str, list[Instr]] = {}
    current: list | None = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        m = _INSTR.search(line)
        if m:
            current.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return out


def split_architectures(sass: str) -> dict[str, str]:
    """``cuobjdump -sass`` of a fat binary -> {"sm_90": its text, ...}."""
    parts: dict[str, list[str]] = {}
    arch = None
    for line in sass.splitlines():
        m = re.search(r"code for (sm_\d+)", line)
        if m:
            arch = m.group(1)
        if arch:
            parts.setdefault(arch, []).append(line)
    return {a: "\n".join(lines) for a, lines in parts.items()}


def _is_vector(op: str) -> bool:
    return any(op == v or op.startswith(v + ".") for v in VECTOR_OPS)


@dataclass
class Loop:
    header: int
    body: set
    latches: set
    parent: int | None = None


@dataclass
class Path:
    """One iteration of a loop along its main path."""
    vector: int = 0
    count: int = 0
    ops: Counter = field(default_factory=Counter)
    nested: list = field(default_factory=list)  #: headers of the nested loops it passes
    deep: int = 0  #: nested loops passed that have loops of their own

    def key(self) -> tuple:
        """What the main path maximises."""
        return (self.vector, -self.deep, self.opcode("MUFU.EX2"), -self.count)

    def __add__(self, other: Path) -> Path:
        return Path(self.vector + other.vector, self.count + other.count, self.ops + other.ops,
                    self.nested + other.nested, self.deep + other.deep)

    def opcode(self, prefix: str) -> int:
        """Instructions whose opcode is `prefix` or starts with `prefix` + '.'."""
        return sum(n for op, n in self.ops.items() if op == prefix or op.startswith(prefix + "."))


class Cfg:
    """Basic blocks, edges and natural loops of one function."""

    def __init__(self, instrs: list[Instr]):
        self.instrs = instrs
        index = {ins.addr: i for i, ins in enumerate(instrs)}
        leaders = {0}
        for i, ins in enumerate(instrs):
            if ins.op.startswith(("BRA", "EXIT", "RET", "BRX", "JMP")):
                if i + 1 < len(instrs):
                    leaders.add(i + 1)
                m = _BRANCH_TARGET.search(ins.args)
                if ins.op.startswith("BRA") and m:
                    leaders.add(index[int(m.group(1), 16)])
        starts = sorted(leaders)
        self.blocks = [(s, starts[j + 1] if j + 1 < len(starts) else len(instrs)) for j, s in enumerate(starts)]
        block_of = {s: k for k, (s, _) in enumerate(self.blocks)}
        self.succ: list[list[int]] = [[] for _ in self.blocks]
        for k, (_, e) in enumerate(self.blocks):
            last = instrs[e - 1]
            follow = k + 1 if k + 1 < len(self.blocks) else None
            if last.op.startswith("BRA.DIV"):
                # to the warp-divergent fallback of the shuffles that follow (emulated lane by
                # lane): not taken while the warp is converged, which the kernel keeps it
                if follow is not None:
                    self.succ[k].append(follow)
            elif last.op.startswith("BRA"):
                self.succ[k].append(block_of[index[int(_BRANCH_TARGET.search(last.args).group(1), 16)]])
                if last.pred and follow is not None:
                    self.succ[k].append(follow)
            elif last.op.startswith(("EXIT", "RET")):
                if last.pred and follow is not None:
                    self.succ[k].append(follow)
            elif follow is not None:
                self.succ[k].append(follow)
        self.pred: list[list[int]] = [[] for _ in self.blocks]
        for k, targets in enumerate(self.succ):
            for t in targets:
                self.pred[t].append(k)
        self.loops = self._loops()

    def ops(self, k: int) -> list[str]:
        s, e = self.blocks[k]
        return [ins.op for ins in self.instrs[s:e]]

    def _dominators(self) -> dict[int, set]:
        reach, stack = {0}, [0]
        while stack:
            for t in self.succ[stack.pop()]:
                if t not in reach:
                    reach.add(t)
                    stack.append(t)
        dom = {k: set(reach) for k in reach}
        dom[0] = {0}
        changed = True
        while changed:
            changed = False
            for k in sorted(reach - {0}):
                preds = [dom[p] for p in self.pred[k] if p in reach]
                new = (set.intersection(*preds) if preds else set()) | {k}
                if new != dom[k]:
                    dom[k], changed = new, True
        return dom

    def _loops(self) -> list[Loop]:
        dom = self._dominators()
        found: dict[int, Loop] = {}
        for k in dom:
            for h in self.succ[k]:
                if h not in dom[k]:
                    continue  # not a back edge
                body, stack = {h, k}, [k]
                while stack:
                    x = stack.pop()
                    if x == h:
                        continue
                    for p in self.pred[x]:
                        if p not in body and p in dom:
                            body.add(p)
                            stack.append(p)
                loop = found.setdefault(h, Loop(h, set(), set()))
                loop.body |= body
                loop.latches.add(k)
        loops = sorted(found.values(), key=lambda lp: len(lp.body))
        for lp in loops:
            lp.parent = next((o.header for o in loops if o is not lp and lp.body < o.body), None)
        return loops

    def loop(self, header: int) -> Loop:
        return next(lp for lp in self.loops if lp.header == header)

    def _best_path(self, start: int, loops: list, inside, done, key) -> Path | None:
        """The best path (by `key`) from block `start` through the blocks `inside` accepts, each
        loop of `loops` entered at its header and left by an exit (in Path.nested); it ends at
        a block where `done` holds (an empty ending is allowed there) or with no way on."""
        owner = {b: lp for lp in loops for b in lp.body}
        visiting: set = set()

        @functools.cache
        def best(k: int) -> Path | None:
            if k in owner and owner[k].header != k or k in visiting:
                return None
            visiting.add(k)
            try:
                if k in owner:
                    lp = owner[k]
                    here = Path(nested=[k], deep=int(any(o.parent == k for o in self.loops)))
                    targets = sorted({t for b in lp.body for t in self.succ[b] if t not in lp.body})
                else:
                    ops = self.ops(k)  # NOPs too: the scheduler issues them
                    here = Path(sum(map(_is_vector, ops)), len(ops), Counter(ops))
                    targets = self.succ[k]
                targets = [t for t in targets if inside(t)]
                options = [o for o in (best(t) for t in targets) if o is not None]
                if done(k, targets):
                    options.append(Path())
                return here + max(options, key=key) if options else None
            finally:
                visiting.discard(k)

        return best(start)

    def main_path(self, loop: Loop) -> Path | None:
        """One iteration of `loop` from its header back to it, nested loops skipped (entered at
        their header, left by an exit), preferring vector memory instructions, then no doubly
        nested loop, then more MUFU.EX2, then fewer instructions (Path.key)."""
        return self._best_path(loop.header, [lp for lp in self.loops if lp.parent == loop.header],
                               lambda t: t in loop.body and t != loop.header,
                               lambda k, targets: k in loop.latches, Path.key)

    def kernel_path(self) -> Path | None:
        """The kernel from its entry to an exit, loops skipped (entered at their header, left by
        an exit; they are in Path.nested): at each branch the side with more vector memory
        instructions, then without a doubly nested loop, then with more MUFU.EX2, then the
        longer one (a warp whose lanes diverge issues both sides; this counts the longer)."""
        return self._best_path(0, [lp for lp in self.loops if lp.parent is None], lambda t: True,
                               lambda k, targets: not targets,
                               lambda p: (p.vector, -p.deep, p.opcode("MUFU.EX2"), p.count))


#: Bytes one thread moves through shared memory per instruction (loads and stores; LDGSTS
#: writes 16 bytes).
_SMEM_BYTES = {"LDS": 4, "LDS.U8": 1, "LDS.64": 8, "LDS.128": 16, "STS": 4, "STS.64": 8, "STS.128": 16,
               "LDGSTS.E.BYPASS.128": 16}


def smem_bytes(ops: Counter) -> int:
    return sum(n * _SMEM_BYTES.get(op, 0) for op, n in ops.items())


@dataclass
class StepCounts:
    """Instructions of a kernel's decaying path, per thread."""
    tile: int                    #: one tile along the main path, without the state loop
    state: int                   #: one iteration of the state loop (0: states unrolled)
    states: int                  #: N
    mufu_tile: int
    mufu_state: int
    tile_ops: Counter
    state_ops: Counter
    setup: int = 0               #: once per block before the tile loop (every instruction there,
                                 #: both sides of its branches, loops but the map loop excluded)
    tail: int = 0                #: once per block after it, the same way
    map_cost: float = 0.0        #: pass 2: per map of an earlier segment a thread composes

    @property
    def smem_per_step(self) -> float:
        """Shared-memory bytes per (channel, step)."""
        return (smem_bytes(self.tile_ops) + self.states * smem_bytes(self.state_ops)) / ITEMS

    @property
    def per_tile(self) -> int:
        return self.tile + self.states * self.state

    @property
    def per_step(self) -> float:
        """Instructions per (channel, step): a lane owns ITEMS steps of one channel per tile."""
        return self.per_tile / ITEMS

    @property
    def mufu_per_step(self) -> float:
        return (self.mufu_tile + self.states * self.mufu_state) / ITEMS


def decaying_counts(instrs: list[Instr], states: int) -> StepCounts:
    """The decaying path's tile loop of a kernel: the loop whose main path has 128-bit loads and
    either a nested state loop with >= ITEMS MUFU.EX2 (one pass, pass 2) or >= ITEMS x N
    MUFU.EX2 itself (pass 1, states unrolled)."""
    cfg = Cfg(instrs)
    best: StepCounts | None = None
    for lp in cfg.loops:
        path = cfg.main_path(lp)
        if path is None or not path.opcode("LDG.E.128"):
            continue
        inner = [cfg.main_path(cfg.loop(h)) for h in path.nested]
        state_loops = [p for p in inner if p is not None and p.opcode("MUFU.EX2") >= ITEMS]
        if len(state_loops) == 1 and len(inner) == 1:
            s = state_loops[0]
            found = StepCounts(path.count, s.count, states, path.opcode("MUFU"), s.opcode("MUFU"), path.ops, s.ops)
        elif not inner and path.opcode("MUFU.EX2") >= ITEMS * states:
            found = StepCounts(path.count, 0, states, path.opcode("MUFU"), 0, path.ops, Counter())
        else:
            continue
        if best is not None:
            raise ValueError("two decaying tile loops in one kernel")
        found.setup, found.tail, found.map_cost = _outside(cfg, lp)
        best = found
    if best is None:
        raise ValueError("no decaying tile loop found")
    return best


def _outside(cfg: Cfg, tile: Loop) -> tuple:
    """(setup, tail, map cost) around the tile loop: the longest path from the kernel's entry to
    the tile loop, and from the tile loop to the end, other loops skipped (a block's once-only
    work, counting the longer side of every branch: a warp whose lanes diverge issues both), and
    the map loop of pass 2 (64-bit map loads) as instructions per map."""
    tops = [lp for lp in cfg.loops if lp.parent is None and lp is not tile]
    owner = {b: lp for lp in tops for b in lp.body}
    map_cost = 0.0
    for lp in cfg.loops:
        if lp is tile or lp.header in tile.body:
            continue
        path = cfg.main_path(lp)
        maps = path.opcode("LDG.E.64") if path else 0
        if maps:  # the unrolled main loop: the most maps per iteration
            map_cost = path.count / maps if map_cost == 0.0 else min(map_cost, path.count / maps)

    def successors(k: int) -> list:
        if k in owner:
            lp = owner[k]
            return sorted({t for b in lp.body for t in cfg.succ[b] if t not in lp.body})
        return cfg.succ[k]

    def cost(k: int) -> int:
        if k in owner:
            return 0
        return len(cfg.ops(k))

    def longest(start: int, stop) -> int:
        visiting: set = set()

        @functools.cache
        def best(k: int) -> int:
            if stop(k):
                return 0
            if k in visiting or (k in owner and owner[k].header != k):
                return -10 ** 9
            visiting.add(k)
            try:
                tails = [best(t) for t in successors(k)]
                return cost(k) + max(tails, default=0)
            finally:
                visiting.discard(k)

        return max(best(start), 0)

    if not tile.body:
        return 0, 0, map_cost
    setup = longest(0, lambda k: k == tile.header)
    exits = sorted({t for b in tile.body for t in cfg.succ[b] if t not in tile.body})
    tail = max((longest(t, lambda k: k in tile.body) for t in exits), default=0)
    return setup, tail, map_cost


def fused_counts(instrs: list[Instr], states: int) -> StepCounts:
    """The fused kernel (one tile per block, no tile loop): the kernel's path (Cfg.kernel_path:
    setup, loads, softplus, staging, store) as `tile`, its two state loops (phase 1 with the
    lane scan, phase 2 with the replay) as one `state`, and the map loop's cost per map."""
    cfg = Cfg(instrs)
    path = cfg.kernel_path()
    if path is None:
        raise ValueError("no path through the fused kernel")
    phases = [cfg.main_path(cfg.loop(h)) for h in path.nested]
    phases = [p for p in phases if p is not None and p.opcode("MUFU.EX2") >= ITEMS - 1]
    first = [p for p in phases if p.opcode("SHFL") >= 8]
    second = [p for p in phases if not p.opcode("SHFL")]
    if len(first) != 1 or len(second) != 1:
        raise ValueError("the fused kernel's two state loops not found")
    state_ops = first[0].ops + second[0].ops
    _, _, map_cost = _outside(cfg, Loop(-1, set(), set()))
    return StepCounts(path.count, first[0].count + second[0].count, states, path.opcode("MUFU"),
                      first[0].opcode("MUFU") + second[0].opcode("MUFU"), path.ops, state_ops, map_cost=map_cost)
