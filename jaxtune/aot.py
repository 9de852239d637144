"""`jaxtune compile`: the run's real train and eval steps compiled ahead of time for a TPU slice (or a
GPU) this machine does not have, by that device's own compiler, and what the compiler says.

JAX compiles for a device description as it does for a device (MaxText's train_compile.py does the
same): `jax.experimental.topologies.get_topology_desc` gives the slice's devices from libtpu, the
step is built exactly as `jaxtune train` builds it (`loop.jit_steps`: shardings, donation, the
attention kernel the platform picks) from abstract weights (`estimate.abstract_run`), and
`.lower().compile()` runs the real TPU compiler. Nothing is read but config.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import tempfile
import time
import types
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune import atomic, estimate as estimate_mod, hlo, sharding
from jaxtune.cache import cache_dir
from jaxtune.data import packing
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import parameter_count
from jaxtune.train.step import chunk_size

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation as `gcloud` names its slices, per JAX device (a v2/v3 core, a v4/v5p chip)."""
    kind: str
    device_kind: str  # what jax.devices()[0].device_kind says on it
    hbm: int  # bytes per JAX device
    bf16_flops: float  # peak dense bf16 FLOP/s per JAX device
    prefix: str  # libtpu's topology name prefix
    counts_cores: bool  # v2/v3/v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips
    megacore: bool  # one device per chip (v4, v5p); v2/v3 are a device per core
    dims: int


CHIPS = {
    "v2": Chip("TPU v2", "TPU v2", 8 * GiB, 22.5e12, "v2", True, False, 2),
    "v3": Chip("TPU v3", "TPU v3", 16 * GiB, 61.5e12, "v3", True, False, 2),
    "v4": Chip("TPU v4", "TPU v4", 32 * GiB, 275e12, "v4", True, True, 3),
    "v5p": Chip("TPU v5p", "TPU v5", 95 * GiB, 459e12, "v5", True, True, 3),
    "v5litepod": Chip("TPU v5e", "TPU v5 lite", 16 * GiB, 197e12, "v5e", False, False, 2),
    "v6e": Chip("TPU v6e", "TPU v6 lite", 32 * GiB, 918e12, "v6e", False, False, 2),
}
ALIASES = {"v5e": "v5litepod"}
GRIDS = {  # chips -> the slice's chip grid, as Cloud TPU builds them
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
        512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)},
}


# GPUs, described to XLA:GPU by their public figures (what cudaGetDeviceProperties reports): XLA compiles
# for such a description as for the card. Memory as nvidia-smi reports it (estimate.DEVICES).
@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    compute_capability: tuple
    sms: int
    clock_ghz: float
    memory: int
    bandwidth: float  # bytes/s
    l2: int
    shared_per_sm: int
    shared_per_block_optin: int
    bf16_flops: float  # dense tensor-core peak


MiB = 1024**2
CARDS = {
    "a100-40gb": Card("NVIDIA A100-SXM4-40GB", (8, 0), 108, 1.41, 40960 * MiB, 1.555e12, 40 * MiB, 167936, 166912, 312e12),
    "a100-80gb": Card("NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 81920 * MiB, 2.039e12, 40 * MiB, 167936, 166912, 312e12),
    "h100": Card("NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 81559 * MiB, 3.35e12, 50 * MiB, 233472, 232448, 989e12),
    "h200": Card("NVIDIA H200", (9, 0), 132, 1.98, 143771 * MiB, 4.8e12, 50 * MiB, 233472, 232448, 989e12),
}


def gpu_target_config(card: Card) -> str:
    """A GpuTargetConfigProto (text) for `card`: the device facts XLA:GPU compiles for."""
    major, minor = card.compute_capability
    hopper = "\n    feature_extension: ACCELERATED_FEATURES" if major >= 9 else ""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {card.shared_per_sm}
  shared_memory_per_block_optin: {card.shared_per_block_optin}
  threads_per_core_limit: 2048
  core_count: {card.sms}
  fpus_per_core: {64 if major == 8 else 128}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(card.bandwidth)}
  l2_cache_size: {card.l2}
  clock_rate_ghz: {card.clock_ghz}
  device_memory_size: {card.memory}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}{hopper}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  name: "{card.name}"
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
}}
device_description_str: "{card.name}"
"""


@dataclasses.dataclass
class Target:
    name: str
    platform: str  # "tpu" or "gpu"
    chip: Chip
    devices: list
    hosts: int


def _grid(chip: Chip, chips: int, name: str) -> tuple:
    grids = GRIDS[chip.dims]
    if chips not in grids:
        sizes = sorted(n * (2 if chip.counts_cores else 1) for n in grids)
        raise JaxtuneError(f"--topology {name}: no such slice; {name.split('-')[0]} comes in "
                           f"{', '.join(map(str, sizes))}")
    return grids[chips]


def target(name: str) -> Target:
    """The device a --topology names: a TPU slice (v4-8) or GPUs (h100-8)."""
    m = re.fullmatch(r"(a100-40gb|a100-80gb|h100|h200)-(\d+)", name)
    return gpu_target(CARDS[m.group(1)], int(m.group(2)), name) if m else tpu_target(name)


def gpu_target(card: Card, count: int, name: str) -> Target:
    """`count` GPUs of one host, compiled for by XLA:GPU from the card's description (needs the CUDA
    plugin, `pip install 'jaxtune[gpu]'`; no GPU, no driver)."""
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(card),
                                            topology=f"1x1x{count}")
    except Exception as e:  # no CUDA plugin, or one that rejects the description
        raise JaxtuneError(f"--topology {name}: XLA:GPU is not available here ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); install it with "
                           "pip install 'jaxtune[gpu]' (the CUDA plugin; no GPU needed)") from None
    chip = Chip(card.name, card.name, card.memory, card.bf16_flops, "", False, False, 0)
    return Target(name, "gpu", chip, list(desc.devices), 1)


def tpu_target(name: str) -> Target:
    """The devices of a TPU slice named as `gcloud` names accelerator types (v4-8, v5litepod-16, v6e-8)."""
    m = re.fullmatch(r"(v\d\w*)-(\d+)", name)
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in CHIPS:
        raise JaxtuneError(f"--topology {name}: expected a TPU type as gcloud names it: "
                           f"{', '.join(g + '-N' for g in CHIPS)} (e.g. v4-8, v5litepod-16, v6e-8), "
                           f"or GPUs: {', '.join(c + '-N' for c in CARDS)} (e.g. h100-8)")
    chip, n = CHIPS[gen], int(m.group(2))
    chips = n // 2 if chip.counts_cores else n
    grid = _grid(chip, chips, name)
    host = (2, 2, 1) if chip.dims == 3 or chips > 8 or chip.counts_cores else (*grid, 1)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)  # libtpu otherwise probes a metadata server
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a compile beside another jax process
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{chip.prefix}:{'x'.join(map(str, grid))}",
            chip_config_name="megacore" if chip.megacore else "default", chips_per_host_bounds=host, num_slices=1)
    except Exception as e:  # no libtpu, or one that does not know this chip
        raise JaxtuneError(f"--topology {name}: the TPU compiler is not available here ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); install it with "
                           "pip install 'jaxtune[tpu]' (libtpu; no TPU needed)") from None
    hosts = max(1, len({d.process_index for d in desc.devices}))
    return Target(name, "tpu", chip, list(desc.devices), hosts)


@contextlib.contextmanager
def captured_stderr():
    """The native compiler's warnings (written to fd 2), as a list that fills when the block ends."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


@dataclasses.dataclass
class Report:
    """One compile of a run for one target."""
    target: Target
    estimate: estimate_mod.Estimate
    seconds: float
    memory: object = None  # CompiledMemoryStats of the train step
    eval_memory: object = None
    stats: hlo.Stats | None = None
    model_flops: float = 0.0  # per micro-step, all devices
    tokens: int = 0  # per micro-step, all devices
    remat_warnings: int = 0
    error: str = ""  # why it does not compile, with the keys that would help
    attention: str = ""
    checks: list = dataclasses.field(default_factory=list)
    chips: int = 0  # devices the run's mesh spans (a one-chip preset uses one of the slice's)
    kernel_flops: float = 0.0  # attention inside Pallas kernels, per device, counted analytically
    cached: bool = False  # the compiler's answer came from the compile cache (same program, same compiler)

    @property
    def peak(self) -> int:
        """The compiler's bytes per device: arguments + outputs + temporaries, less what donation aliases."""
        return _peak(self.memory)

    @property
    def fits(self) -> bool:
        return not self.error and self.peak <= self.target.chip.hbm

    @property
    def flops(self) -> float:
        """Matmul FLOPs of a micro-step per device: the HLO's, plus the attention inside kernels."""
        return self.stats.flops + self.kernel_flops

    @property
    def step_seconds(self) -> float:
        """A micro-step's matmuls at the chip's bf16 peak: a floor on its time, never a prediction."""
        return self.flops / self.target.chip.bf16_flops

    def text(self) -> str:
        t, chip = self.target, self.target.chip
        used = f" (the mesh uses {self.chips})" if self.chips and self.chips != len(t.devices) else ""
        head = f"{t.name}: {len(t.devices)} x {chip.kind} ({chip.hbm / GiB:.0f} GiB each){used}, {t.hosts} " \
               f"host{'s' * (t.hosts > 1)}"
        if self.estimate is not None:
            head += f", mesh {self.estimate.mesh}, attention {self.attention!r}, remat {self.estimate.remat!r}"
        if self.error:
            return f"{head}\n  DOES NOT COMPILE ({self.seconds:.0f} s): {self.error}"
        est = self.estimate.total
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines = [head,
                 f"  memory per device: {self.peak / GiB:.2f} GiB by the compiler (arguments "
                 f"{self.memory.argument_size_in_bytes / GiB:.2f} + temporaries {self.memory.temp_size_in_bytes / GiB:.2f}"
                 f" + outputs not donated) of {chip.hbm / GiB:.0f} GiB: {verdict}; the estimate says "
                 f"{est / GiB:.2f} GiB ({est / self.peak:.2f}x, {self.estimate.calibration} calibration)",
                 f"  in host memory (model.remat='offload'): {self.memory.host_temp_size_in_bytes / GiB:.2f} GiB per "
                 "device" if self.memory.host_temp_size_in_bytes else "",
                 f"  eval step: {_peak(self.eval_memory) / GiB:.2f} GiB per device" if self.eval_memory else "",
                 f"  matmul FLOPs per micro-step per device: {self.flops / 1e12:.3f} TFLOP (from the HLO, "
                 f"loops counted by their trip counts{self._kernel_note()})",
                 f"  ceiling at the {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16 peak: {self.tokens / self.step_seconds:,.0f}"
                 f" tokens/s, MFU <= {self.mfu:.2f} (no step is faster; communication and memory-bound work "
                 f"come on top)",
                 f"  compile: {self.seconds:.0f} s" + (" (the answer of an earlier identical compile, from "
                                                       f"{cache_dir() / 'compile'})" if self.cached else ""),
                 "  collectives per micro-step: " + (", ".join(
                     f"{k} {n} ({b / GiB:.2f} GiB)" for k, (n, b) in sorted(self.stats.collectives.items()))
                     or "none")]
        lines += [f"  {c}" for c in self.checks]
        return "\n".join(line for line in lines if line)

    @property
    def mfu(self) -> float:
        total = self.flops * self.chips
        return self.model_flops / total if total else 0.0

    def _kernel_note(self) -> str:
        return (f"; {self.kernel_flops / 1e12:.3f} of them are the attention inside {self.stats.kernels} Pallas "
                f"kernel calls, which the HLO does not show: counted analytically" if self.stats.kernels else "")


def _peak(m) -> int:
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def model_flops(run: estimate_mod.AbstractRun, method: str, tokens: int, seq_len: int) -> float:
    """Model FLOPs of one micro-step (PaLM's count: 2 per weight per token forward, x3 with weight
    gradients, x2 for LoRA/QLoRA whose frozen weights get none; causal attention 2·T·d per layer)."""
    cfg = run.model_cfg
    model = nnx.merge(run.graphdef, run.trainable, run.frozen)
    weights = parameter_count(model) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    forward = 2 * weights + 2 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return (3 if method == "full" else 2) * forward * tokens


def kernel_attention_flops(mcfg, cfg, devices: int) -> float:
    """Matmul FLOPs of causal attention in the kernels, per device: forward 2·B·H·T²·D (QKᵀ and PV over
    the half of T x T a causal mask keeps; a sliding window keeps less), again when remat recomputes the
    layer, and 2.5x the forward for the backward (FlashAttention-2's count)."""
    t = cfg.data.seq_len
    kept = t * t / 2 if mcfg.sliding_window is None else t * min(t, mcfg.sliding_window) - min(
        t, mcfg.sliding_window) ** 2 / 2
    forward = 4 * cfg.train.micro_batch_size * mcfg.num_heads * kept * mcfg.head_dim
    passes = 1 + 2.5 + (1 if mcfg.remat != "none" else 0)
    return mcfg.num_layers * forward * passes / devices


def failure(error: Exception, cfg) -> str:
    """One paragraph: what stopped the compile and the config keys that would help."""
    text = str(error)
    oom = re.search(r"(?:temporaries|required)[^(]*\(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)", text)
    if "RESOURCE_EXHAUSTED" in text or oom:
        need = f" ({oom.group(1)} needed, {oom.group(2)} available)" if oom else ""
        return f"out of device memory{need}. " + "; ".join(memory_levers(cfg))
    if "Mosaic kernels cannot be automatically partitioned" in text:
        return ("a Pallas kernel sits outside a shard_map (jaxtune bug: please report it); "
                "model.attention='blocked' compiles without it")
    first = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
    return f"{type(error).__name__}: {first[:400]}"


def memory_levers(cfg) -> list[str]:
    """The config keys that would lower memory per chip, only those not already at their floor."""
    levers = []
    if cfg.train.micro_batch_size > 1:
        levers.append(f"lower train.micro_batch_size={cfg.train.micro_batch_size} (raise train.grad_accum_steps "
                      "to keep the batch)")
    if cfg.model.remat != "full":
        levers.append(f"set model.remat='full' (now {cfg.model.remat!r})")
    levers.append(f"shorten data.seq_len={cfg.data.seq_len}")
    levers.append("spread the weights over more chips (mesh.fsdp=-1 on a larger slice)" if cfg.mesh.fsdp != 1 else
                  "shard the weights over the slice's chips (mesh.fsdp=-1)")
    if cfg.method != "qlora":
        levers.append("use method='qlora' (a frozen NF4 base)")
    return levers


def compile_run(cfg, target: Target, eval_step: bool = True) -> Report:
    """Compile `cfg`'s train and eval steps for `target`; a failure is a Report with `error` set."""
    from jaxtune.train import loop

    devices = len(target.devices)
    try:
        est = estimate_mod.estimate(cfg, devices, platform=target.platform, capacity=target.chip.hbm,
                                    device_kind=target.chip.device_kind)
    except JaxtuneError as e:  # e.g. a batch this slice's mesh does not divide: that row, not the whole table
        return Report(target, None, 0.0, error=str(e))
    cfg = estimate_mod.with_remat(cfg, est.remat)
    mesh = sharding.config_mesh(cfg.mesh, devices=target.devices)
    run = estimate_mod.abstract_run(cfg, platform=target.platform, device_kind=target.chip.device_kind,
                                    context=dict(mesh.shape)["context"])
    shardings = [sharding.state_shardings(s, mesh) for s in (run.trainable, run.frozen, run.opt_state)]
    steps = loop.jit_steps(cfg, mesh, run.graphdef, run.tx, *shardings, packing.ROW_FIELDS)
    args = train_args(cfg, steps, run.trainable, run.frozen, run.opt_state)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    report = Report(target, est, 0.0, tokens=tokens, attention=run.model_cfg.attention, chips=mesh.size,
                    model_flops=model_flops(run, cfg.method, tokens, cfg.data.seq_len))
    start = time.perf_counter()
    try:
        with captured_stderr() as warnings:
            lowered = [steps.train_step.lower(*args)]
            lowered += [steps.eval_step.lower(args[0], args[1], args[3])] if eval_step else []
            key = cache_key(lowered, target)
            result = cached(key)
            compiled = None if result else [step.compile() for step in lowered]
    except Exception as e:  # the compiler's verdict (XLA, Mosaic, Triton errors alike), named
        if isinstance(e, (TypeError, KeyError, AttributeError)):  # a bug of jaxtune's, not a verdict
            raise
        report.seconds = time.perf_counter() - start
        report.error = failure(e, cfg)
        return report
    if result is None:
        result = {"seconds": time.perf_counter() - start, "hlo": compiled[0].as_text(),
                  "memory": [_memory_dict(c.memory_analysis()) for c in compiled],
                  "remat_warnings": sum("involuntary full rematerialization" in line for line in warnings)}
        store(key, result)
    report.cached, report.seconds = compiled is None, result["seconds"]
    memories = [types.SimpleNamespace(**{**dict.fromkeys(MEMORY_FIELDS, 0), **m}) for m in result["memory"]] + [None]
    report.memory, report.eval_memory = memories[0], memories[1]
    report.stats = hlo.analyze(result["hlo"])
    if report.stats.kernels:
        report.kernel_flops = kernel_attention_flops(run.model_cfg, cfg, mesh.size)
    report.remat_warnings = result["remat_warnings"]
    report.checks = checks(report, run, cfg)
    return report


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes", "host_temp_size_in_bytes")


def _memory_dict(m) -> dict:
    return {name: int(getattr(m, name, 0)) for name in MEMORY_FIELDS}


def compiler_versions() -> str:
    """The packages whose compiler gave the answer: a new libtpu or plugin is a new cache key."""
    found = []
    for name in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"):
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return " ".join(found)


def cache_key(lowered: list, target: Target) -> str:
    """The same program (the lowered StableHLO) for the same target by the same compiler and flags
    compiles to the same thing: a re-run of the table costs lowering, not compiling (8B: minutes)."""
    parts = [target.name, compiler_versions(), os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", "")]
    digest = hashlib.sha256("\n".join(parts).encode())
    for step in lowered:
        digest.update(step.as_text().encode())
    return digest.hexdigest()


def _cache_path(key: str) -> Path:
    return cache_dir() / "compile" / f"{key}.json.gz"


def cached(key: str) -> dict | None:
    """A stored compile result (None when absent or unreadable: then it is compiled again)."""
    try:
        return json.loads(gzip.decompress(_cache_path(key).read_bytes()))
    except (OSError, ValueError):
        return None


def store(key: str, result: dict) -> None:
    try:
        _cache_path(key).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_file(_cache_path(key), lambda f: f.write(gzip.compress(json.dumps(result).encode())), binary=True)
    except OSError:  # a read-only cache costs a re-compile next time, nothing else
        pass


def train_args(cfg, steps, trainable, frozen, opt_state) -> tuple:
    """The train step's arguments (the batch, scalar, key and flags abstract), each with the sharding
    the loop gives it."""
    b, t = cfg.train.micro_batch_size, cfg.data.seq_len
    batch = {name: jax.ShapeDtypeStruct((b, t), jnp.float32 if name == "weights" else jnp.int32,
                                        sharding=steps.batch_sharding) for name in steps.batch_fields}
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    flags = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=steps.flag_sharding)
    return trainable, frozen, opt_state, batch, scalar, key, flags


def checks(report: Report, run, cfg) -> list[str]:
    """The HLO checks: involuntary rematerialization, the vocabulary matrices gathered whole (their
    hidden dimension; the vocabulary may stay split over `tensor`), and float32 [B, T, vocab] logits
    (a buffer as large as a device's logits of its whole micro-batch, where the loss is chunked)."""
    mcfg, stats, mesh = run.model_cfg, report.stats, report.estimate.mesh
    v, d, t = mcfg.vocab_size, mcfg.hidden_size, cfg.data.seq_len
    vocab = {v, v // mesh["tensor"]}
    out = [f"involuntary full rematerialization: {report.remat_warnings or 'none'}"]
    gathered = sum(n for dims, n in stats.gathers_of.items() if len(dims) >= 2 and (
        (dims[-2] in vocab and dims[-1] == d) or (dims[-2] == d and dims[-1] in vocab)))
    out.append(f"whole [vocab, hidden] matrices gathered per micro-step: {gathered}")
    rows = max(1, cfg.train.micro_batch_size // (mesh["data"] * mesh["fsdp"]))
    chunked = chunk_size(t, cfg.train.loss_chunk) < t  # else one chunk is the whole row, as the config asks
    logits = [dims for dt, dims in stats.buffers if chunked and dt == "f32" and vocab & set(dims)
              and math.prod(dims) >= rows * t * v // mesh["tensor"]]
    out.append(f"float32 [B, T, vocab] buffers: {', '.join(map(str, logits)) if logits else 'none'}")
    return out


def compiled_summary(cfg, steps, trainable, frozen, opt_state, est) -> str:
    """`jaxtune train`'s own compile of its train step (the loop's first call reuses it), in one line:
    the compiler's memory per device beside the estimate, the matmul FLOPs and, on an accelerator
    whose peak is known, the tokens/s ceiling."""
    b, t = cfg.train.micro_batch_size, cfg.data.seq_len
    args = train_args(cfg, steps, trainable, frozen, opt_state)
    start = time.perf_counter()
    compiled = steps.train_step.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    stats = hlo.analyze(compiled.as_text())
    line = (f"compiled train step ({seconds:.0f} s): {_peak(memory) / GiB:.2f} GiB per device by "
            f"XLA:{jax.default_backend().upper()}")
    if est is not None:
        line += f" (the estimate said {est.total / GiB:.2f}, {est.total / max(_peak(memory), 1):.2f}x)"
    line += f"; {stats.flops / 1e9:,.1f} GFLOP of matmuls per micro-step per device"
    line += " (not the attention inside Pallas kernels)" if stats.kernels else ""
    kind = jax.devices()[0].device_kind
    peaks = {c.device_kind: c.bf16_flops for c in CHIPS.values()} | {c.name: c.bf16_flops for c in CARDS.values()}
    if kind in peaks and stats.flops:
        line += f"; at most {b * t / (stats.flops / peaks[kind]):,.0f} tokens/s at {kind}'s bf16 peak (a ceiling)"
    return line


def markdown_table(reports: list) -> str:
    """(config path, Report) pairs as docs/tpu.md's table."""
    rows = ["| config | topology | fits? | compiler GiB/chip | estimate GiB/chip | step TFLOP/chip | MFU ceiling | "
            "compile s |", "|---|---|---|---|---|---|---|---|"]
    for path, r in reports:
        name = os.path.basename(path).removesuffix(".py")
        if r.error:
            est = f"{r.estimate.total / GiB:.2f}" if r.estimate else "–"
            rows.append(f"| {name} | {r.target.name} | no: {r.error.split(';')[0].split('. ')[0]} | – | {est} | – | – | "
                        f"{r.seconds:.0f} |")
            continue
        rows.append(f"| {name} | {r.target.name} | {'yes' if r.fits else 'no'} | {r.peak / GiB:.2f} | "
                    f"{r.estimate.total / GiB:.2f} | {r.flops / 1e12:.2f} | {r.mfu:.2f} | {r.seconds:.0f} |")
    return "\n".join(rows)
