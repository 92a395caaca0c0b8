"""`kdjax plan`: compile every program of a command for a TPU slice on a CPU machine, and say whether
it fits, how fast it can run at best, and what moves the bytes.

libtpu's compile-only client (`jax.experimental.topologies.get_topology_desc`) gives the chips of a
named slice without any TPU attached; each program of `kdjax.programs` is lowered from abstract
inputs and compiled by XLA's TPU compiler for them. Per program and per chip:

  HBM       XLA's compiled memory analysis: arguments, outputs, temporaries, and the peak
            (arguments + outputs - donated + temporaries) against what XLA lets a program use;
  cost      FLOPs and HBM bytes summed over the optimized HLO (`kdjax.hlo_cost`: loops counted by
            their trip counts, which XLA's own cost analysis does not do);
  roofline  step time >= max(FLOPs / bf16 peak, bytes / HBM bandwidth): the bound it hits, tokens/s
            and MFU (the program's model FLOPs over that time at the chip's peak). A floor on the
            time, not a prediction: it leaves out collectives, kernel launch gaps and imperfect
            overlap, and counts each operand read once;
  compile   seconds to compile (on this machine).

A program that does not fit is one line (which program, how many GiB over, the knobs that help),
never a traceback.

The compile-only process needs libtpu (`pip install 'kdjax[tpu]'`) and these variables, which
`compile_env()` sets before libtpu starts: ALLOW_MULTIPLE_LIBTPU_LOAD=1 (no host lockfile, so
several compiles and other JAX processes can run at once), TPU_ACCELERATOR_TYPE and
TPU_WORKER_HOSTNAMES=localhost (libtpu does not look for hardware or a metadata server), and
JAX_PLATFORMS=cpu for everything that is not the compile.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, as its documentation gives it; `xla_hbm_gib` is what XLA's TPU compiler
    lets one program use (libtpu 0.0.42.1: the 'available HBM' of its out-of-memory error)."""
    name: str
    hbm: str  # as documented
    xla_hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float
    chips_per_host: int
    cores_per_chip: int  # TensorCores; v4 / v5p slice names (v4-8) count cores, one JAX device a chip
    libtpu_name: str  # the topology prefix libtpu takes
    source: str


CHIPS = {
    "v4": Chip("v4", "32 GiB", 30.75, 275.0, 1200.0, 4, 2, "v4", "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "16 GB", 15.75, 197.0, 819.0, 8, 1, "v5e", "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "95 GB", 95.74, 459.0, 2765.0, 4, 2, "v5", "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "32 GB", 31.25, 918.0, 1638.0, 8, 1, "v6e", "https://cloud.google.com/tpu/docs/v6e"),
}
# chips -> the usual slice shape (3D tori for v4 / v5p, 2D for v5e / v6e)
SHAPES_3D = {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Slice:
    chip: Chip
    shape: str  # "2x4", "2x2x1"
    chips: int

    @property
    def name(self) -> str:
        """The accelerator type one books: v4-8 (cores), v5e-8 (chips)."""
        prefix = {"v5e": "v5litepod"}.get(self.chip.name, self.chip.name)
        return f"{prefix}-{self.chips * self.chip.cores_per_chip}"

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chip.chips_per_host)

    @property
    def topology(self) -> str:
        return f"{self.chip.name}:{self.shape}"


def parse_slice(text: str) -> Slice:
    """'v5e:4x4', 'v4:2x2x1', 'v5p:2x2x1' (topologies) or 'v4-8', 'v5e-16', 'v5litepod-16', 'v5p-8',
    'v6e-8' (accelerator types: cores on v4 / v5p, chips on v5e / v6e)."""
    known = ", ".join(CHIPS)
    err = ValueError(f"--topology={text!r}: expected CHIP:SHAPE (v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:2x4) or an "
                     f"accelerator type (v4-8, v5e-16, v5p-8, v6e-8); chips: {known}")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)[:](\d+(?:x\d+){1,2})", text) or None
    if m:
        chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
        dims = [int(d) for d in m.group(2).split("x")]
        if len(dims) != (3 if chip.name in ("v4", "v5p") else 2) or min(dims) < 1:
            raise err
        return Slice(chip, m.group(2), math.prod(dims))
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", text)
    if not m:
        raise err
    chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
    count = int(m.group(2))
    chips = count // chip.cores_per_chip
    shapes = SHAPES_3D if chip.name in ("v4", "v5p") else SHAPES_2D
    if count % chip.cores_per_chip or chips not in shapes:
        raise ValueError(f"--topology={text}: no {chip.name} slice of {count} "
                         f"{'cores' if chip.cores_per_chip > 1 else 'chips'}; known sizes: "
                         f"{', '.join(f'{chip.name}-{n * chip.cores_per_chip}' for n in shapes)}")
    return Slice(chip, shapes[chips], chips)


# ---- the compile-only client --------------------------------------------------------------------
def libtpu_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("libtpu")
    except PackageNotFoundError:
        return "not installed"


def compile_env(environ=None) -> dict:
    """The variables a compile-only libtpu needs (set only where not already set)."""
    environ = os.environ if environ is None else environ
    wanted = dict(ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_ACCELERATOR_TYPE="v5litepod-8",
                  TPU_WORKER_HOSTNAMES="localhost", TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu")
    for k, v in wanted.items():
        environ.setdefault(k, v)
    import sys
    if environ is os.environ and "jax" in sys.modules:  # imported already: no backend has started yet
        sys.modules["jax"].config.update("jax_platforms", environ["JAX_PLATFORMS"])
    return environ


def slice_devices(sl: Slice):
    """The JAX devices (one a chip) of a slice, from libtpu's compile-only client."""
    compile_env()
    from jax.experimental import topologies
    megacore = sl.chip.cores_per_chip > 1
    try:
        topo = topologies.get_topology_desc(topology_name=f"{sl.chip.libtpu_name}:{sl.shape}", platform="tpu",
                                            **(dict(chip_config_name="megacore") if megacore else {}))
    except Exception as e:  # noqa: BLE001 - no libtpu, or it refused the topology: one line
        lines = [l for l in str(e).splitlines() if l.strip()]
        if "libtpu" in str(e).lower() and ("not found" in str(e).lower() or "no module" in str(e).lower()):
            raise RuntimeError("kdjax plan needs libtpu for its compile-only TPU client: pip install 'kdjax[tpu]' "
                               "(or jax[tpu] of the installed jax version)") from None
        raise RuntimeError(f"libtpu could not describe {sl.topology}: {type(e).__name__}: "
                           f"{lines[0] if lines else e}") from None
    devices = list(topo.devices)
    if len(devices) != sl.chips:
        raise RuntimeError(f"libtpu gave {len(devices)} devices for {sl.topology}, expected {sl.chips}")
    return devices


def make_mesh(cfg, devices):
    """cfg.mesh over the slice's devices (kdjax.sharding.make_mesh); the micro-batches must split."""
    from kdjax.sharding import make_mesh as mesh_of
    m = cfg.mesh
    if m.num_devices and m.num_devices != len(devices):
        devices = devices[:m.num_devices]
    return mesh_of(m.data, m.fsdp, m.tensor, devices=devices)


# ---- one program ---------------------------------------------------------------------------------
def _oom(message: str) -> dict | None:
    """(needed GiB, available GiB) from XLA's out-of-memory error, when it says so."""
    m = re.search(r"\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)", message) or re.search(
        r"[Uu]sed ([\d.]+)([GMK]) of ([\d.]+)([GMK]) hbm", message)
    if not m:
        return None
    unit = {"G": 1.0, "M": 1 / 1024, "K": 1 / 1024 ** 2}
    return dict(needed_gib=float(m.group(1)) * unit[m.group(2)], available_gib=float(m.group(3)) * unit[m.group(4)])


def compile_program(program, sl: Slice) -> dict:
    """Lowers and compiles one kdjax.programs.Program for the slice; its report as a dict."""
    from kdjax import hlo_cost
    from kdjax.model import target_platform
    chip = sl.chip
    out = dict(program=program.name, what=program.what, tokens=program.tokens)
    t0 = time.perf_counter()
    try:
        with target_platform("tpu"):  # traced on this CPU host for the slice's chips
            compiled = program.lower().compile()
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is an answer, not a crash
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        oom = _oom(str(e))
        if oom is None:
            raise
        out.update(fits=False, needed_gib=round(oom["needed_gib"], 2), hbm_gib=chip.xla_hbm_gib,
                   over_gib=round(oom["needed_gib"] - chip.xla_hbm_gib, 2))
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    m = compiled.memory_analysis()
    mem = dict(args=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, donated=m.alias_size_in_bytes,
               temps=m.temp_size_in_bytes)
    peak = mem["args"] + mem["outputs"] - mem["donated"] + mem["temps"]
    out.update({f"{k}_gib": round(v / GIB, 6) for k, v in mem.items()})
    out.update(peak_gib=round(peak / GIB, 6), hbm_gib=chip.xla_hbm_gib, fits=peak / GIB <= chip.xla_hbm_gib,
               over_gib=round(peak / GIB - chip.xla_hbm_gib, 2))
    cost, once = hlo_cost.program_cost(compiled.as_text())
    xla = compiled.cost_analysis() or {}
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    xla_bytes = float(xla.get("bytes accessed", 0.0))
    # XLA's bytes include its kernels' re-reads but count each loop body once: scale them by how
    # much the loops add to the kernels' own traffic (kdjax.hlo_cost, with and without trip counts).
    hbm_bytes = xla_bytes * cost.bytes / once.bytes if once.bytes and xla_bytes else cost.bytes
    peak_flops, bw = chip.bf16_tflops * 1e12, chip.hbm_gbps * 1e9
    compute_s, memory_s, floor_s = cost.flops / peak_flops, hbm_bytes / bw, cost.bytes / bw
    step_s = max(compute_s, memory_s, 1e-12)
    model_flops = program.model_flops / sl.chips
    out.update(flops=cost.flops, hbm_bytes=hbm_bytes, hbm_bytes_floor=cost.bytes,
               collective_bytes=cost.collective_bytes, xla_flops=float(xla.get("flops", 0.0)), xla_bytes=xla_bytes,
               compute_ms=compute_s * 1e3, memory_ms=memory_s * 1e3,
               step_ms=step_s * 1e3, bound="compute" if compute_s >= memory_s else "memory",
               tokens_per_s=round(program.tokens / step_s), model_flops=program.model_flops,
               mfu=round(model_flops / (step_s * peak_flops), 4),
               mfu_floor=round(model_flops / (max(compute_s, floor_s, 1e-12) * peak_flops), 4),
               top_bytes=[[where, b] for where, b in cost.by_source.most_common(6)], notes=cost.notes)
    return out


# ---- advice ----------------------------------------------------------------------------------------
def knobs(cfg, result: dict, sl: Slice) -> list[str]:
    """--config. overrides that lower the per-chip memory of a program, given what is already set."""
    out = []
    train_step = result["program"] == "train_step"
    if train_step and not cfg.remat:
        out.append("--config.remat=True")
    if train_step and cfg.train.batch_size // cfg.train.grad_accum > 1:
        out.append(f"--config.train.grad_accum={cfg.train.grad_accum * 2}")
    if cfg.mesh.fsdp != -1 and cfg.mesh.data != 1:
        out.append("--config.mesh.data=1 --config.mesh.fsdp=-1")
    if train_step and cfg.param_dtype == "float32":
        out.append("--config.param_dtype=bfloat16")
    if train_step and cfg.kd.chunk_size > 256:
        out.append(f"--config.kd.chunk_size={cfg.kd.chunk_size // 2}")
    if not train_step:
        out.append("--config.eval.batch_size (smaller)" if result["program"].startswith("generate")
                   else "--config.train.batch_size (fewer prompts a step)")
    larger = {"v5e": "v5p", "v6e": "v5p", "v4": "v5p"}.get(sl.chip.name)
    if larger:
        out.append(f"a {larger} slice or more chips")
    return out


# ---- the report -------------------------------------------------------------------------------------
def chip_table() -> str:
    lines = ["| chip | HBM (documented) | HBM XLA allows a program | bf16 TFLOP/s | HBM GB/s | chips a host | source |",
             "|---|---|---|---|---|---|---|"]
    for c in CHIPS.values():
        lines.append(f"| {c.name} | {c.hbm} | {c.xla_hbm_gib} GiB | {c.bf16_tflops:g} | {c.hbm_gbps:g} | "
                     f"{c.chips_per_host} | {c.source} |")
    return "\n".join(lines)


def describe(result: dict, sl: Slice, cfg=None) -> str:
    """The human report of one program."""
    r, chip = result, sl.chip
    head = f"{r['program']} ({r['what']})"
    if not r["fits"]:
        needed = r.get("needed_gib", r.get("peak_gib"))
        line = (f"{head}: DOES NOT FIT on {sl.name}: needs {needed:.2f} GiB a chip, {r['over_gib']:.2f} GiB over "
                f"the {chip.xla_hbm_gib} GiB XLA allows a {chip.name} chip")
        if cfg is not None:
            line += "; try " + ", ".join(knobs(cfg, r, sl))
        return line + f" (compiled in {r['compile_s']:.0f} s)"
    gb = lambda x: f"{x / 1e9:,.1f} GB"
    lines = [f"{head}: fits",
             f"  HBM a chip    arguments {r['args_gib']:.2f}, outputs {r['outputs_gib']:.2f} "
             f"(donated {r['donated_gib']:.2f}), temporaries {r['temps_gib']:.2f}, peak {r['peak_gib']:.2f} of "
             f"{chip.xla_hbm_gib} GiB ({100 * r['peak_gib'] / chip.xla_hbm_gib:.0f}%)",
             f"  cost a chip   {r['flops'] / 1e12:,.2f} TFLOP, {gb(r['hbm_bytes'])} HBM traffic (each operand read "
             f"once: {gb(r['hbm_bytes_floor'])}), {gb(r['collective_bytes'])} through collectives",
             f"  roofline      compute {r['compute_ms']:,.1f} ms, memory {r['memory_ms']:,.1f} ms: {r['bound']}-bound, "
             f"{r['step_ms']:,.1f} ms a call, {r['tokens_per_s']:,} tokens/s "
             f"({r['tokens_per_s'] / sl.chips:,.0f} a chip), MFU {100 * r['mfu']:.1f}% "
             f"({100 * r['mfu_floor']:.1f}% with each operand read once)",
             "  most bytes    " + "\n                ".join(
                 f"{100 * b / max(r['hbm_bytes_floor'], 1):4.1f}%  {gb(b):>10}  {where}" for where, b in r["top_bytes"])]
    lines += [f"  note          {n}" for n in r["notes"]]
    lines.append(f"  compiled in {r['compile_s']:.1f} s")
    return "\n".join(lines)


def plan(cfg, topology: str, command: str | None = None, log=print, only=None) -> dict:
    """Compiles every program of `command` (default: cfg.mode; `only`: these names) for the slice;
    returns the report
    {"slice", "topology", "chips", "hosts", "mesh", "command", "chip", "programs": [...]}."""
    from kdjax import programs
    from kdjax.sharding import data_shards
    sl = parse_slice(topology)
    command = command or cfg.mode
    devices = slice_devices(sl)
    mesh = make_mesh(cfg, devices)
    report = dict(slice=sl.name, topology=sl.topology, chips=sl.chips, hosts=sl.hosts, command=command,
                  mesh=dict(mesh.shape), chip=dataclasses.asdict(sl.chip), programs=[])
    rows = cfg.train.batch_size // max(cfg.train.grad_accum, 1)
    shards = data_shards(mesh)
    if command != "grpo" and rows % shards:
        raise ValueError(f"the micro-batch ({cfg.train.batch_size} rows / grad_accum {cfg.train.grad_accum}) does "
                         f"not split over the {shards} data*fsdp chips of {sl.name}: change "
                         f"--config.train.batch_size or --config.mesh.data/fsdp")
    todo = programs.programs_for(command, cfg, mesh)
    unknown = set(only or ()) - {p.name for p in todo}
    if unknown:
        raise ValueError(f"--programs: {sorted(unknown)} not among {command}'s programs {[p.name for p in todo]}")
    for program in todo:
        if only and program.name not in only:
            continue
        result = compile_program(program, sl)
        report["programs"].append(result)
        log(describe(result, sl, cfg))
    return report


# ---- --search: the knobs, one at a time ----------------------------------------------------------
def _meshes(chips: int) -> list[dict]:
    """(data, fsdp, tensor) splits of the chips: FSDP over all first, then data or tensor parts."""
    out = [dict(data=1, fsdp=chips, tensor=1)]
    for tensor in (2, 4):
        if chips % tensor == 0 and chips > tensor:
            out.append(dict(data=1, fsdp=chips // tensor, tensor=tensor))
    for data in (2, 4):
        if chips % data == 0 and chips > data:
            out.append(dict(data=data, fsdp=chips // data, tensor=1))
    return out


def search_space(cfg, sl: Slice) -> list[tuple[str, list[dict]]]:
    """The knobs `--search` turns, each a list of --config. overrides (dotted field -> value)."""
    return [
        ("mesh", [{f"mesh.{k}": v for k, v in m.items()} for m in _meshes(sl.chips)]),
        ("remat", [{"remat": False}, {"remat": True, "remat_policy": "nothing_saveable"},
                   {"remat": True, "remat_policy": "dots_with_no_batch_dims_saveable"}]),
        ("loss chunk", [{"kd.chunk_size": c} for c in (512, 1024, 2048, 4096)]),
        ("micro-batches", [{"train.grad_accum": a} for a in (1, 2, 4)
                           if cfg.train.batch_size % a == 0]),
    ]


def with_overrides(cfg, overrides: dict):
    """A copy of cfg with dotted fields set (cfg itself unchanged)."""
    import copy
    from kdjax.train_config import override
    return override(copy.deepcopy(cfg), overrides)


def _field(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def overrides_text(overrides: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in sorted(overrides.items()))


def search(cfg, topology: str, command: str | None = None, budget: int = 12, log=print) -> list[dict]:
    """Turns one knob at a time (mesh, remat, loss chunk, micro-batches), keeping the best setting
    of each before the next, compiling the command's training step at most `budget` times.
    Returns the compiled settings, best first (fitting ones by roofline tokens/s)."""
    from kdjax import programs
    from kdjax.sharding import data_shards
    sl = parse_slice(topology)
    command = command or cfg.mode
    devices = slice_devices(sl)
    best: dict = {}
    tried: list[dict] = []
    score = lambda r: (r["fits"], r.get("tokens_per_s", 0), -r.get("peak_gib", r.get("needed_gib", 0)))
    given_mesh = {f"mesh.{k}": v for k, v in make_mesh(cfg, devices).shape.items()}
    for knob, options in [("as given", [{}])] + search_space(cfg, sl):
        for option in options:
            if len(tried) >= budget:
                break
            if option == given_mesh:
                continue  # the mesh the config already gives
            overrides = {k: v for k, v in {**best, **option}.items() if _field(cfg, k) != v}
            if any(t["overrides"] == overrides for t in tried):
                continue
            c = with_overrides(cfg, overrides)
            try:
                mesh = make_mesh(c, devices)
                rows = c.train.batch_size // c.train.grad_accum
                if rows % data_shards(mesh):
                    continue
                step = programs.programs_for(command, c, mesh)[0]
                result = compile_program(step, sl)
            except ValueError as e:
                log(f"  skipped {overrides_text(overrides)}: {e}")
                continue
            result["overrides"] = overrides
            tried.append(result)
            state = (f"{result['tokens_per_s']:,} tokens/s, MFU {100 * result['mfu']:.1f}%, "
                     f"peak {result['peak_gib']:.2f} GiB" if result["fits"] else
                     f"does not fit ({result['over_gib']:.2f} GiB over)")
            log(f"  [{knob}] {overrides_text(overrides) or '(the config as given)'}: {state} "
                f"(compiled in {result['compile_s']:.0f} s)")
        ranked = sorted(tried, key=score, reverse=True)
        if ranked and ranked[0]["fits"]:
            best = dict(ranked[0]["overrides"])
    return sorted(tried, key=score, reverse=True)
