"""`jaxtune estimate`: the memory one device needs for a run, before any weight is loaded.

Everything held for the whole run is counted exactly from the run's own abstract model (built with
`nnx.eval_shape` from config.json alone: no weights are read): frozen weights by dtype (NF4 codes and
scales included), trainable weights, optimizer state (`tx.init` traced abstractly), one gradient.
Activations come from JAX itself: one layer's forward is traced with `jax.vjp` under the run's remat
policy and the residuals it keeps for the backward are summed (times the layers, plus the scanned
residual stream); the backward of a layer also needs that layer's full forward again (when remat
dropped it) and its cotangents. The loss adds float32 logits of one `train.loss_chunk` at a time.
Each part is divided over the mesh as the shardings divide it. `tests/test_estimate.py` holds the
total to XLA's own figure for the compiled step (`memory_analysis()`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtune import attention, context, lora, quant, sharding
from jaxtune.errors import JaxtuneError
from jaxtune.models.hf import config_from_hf, hf_name, read_hf_config
from jaxtune.models.llama import (HOST_OFFLOAD, REMAT_POLICIES, Llama, ModelConfig, NF4Kernel, QuantizedArray, rope_inv_freq,
                                   rope_tables)

GiB = 1024**3
MiB = 1024**2
# Memory of one JAX device (a TPU v2/v3 chip is two devices, one per core; GPUs: what nvidia-smi reports).
DEVICES = (
    ("TPU v2", 8 * GiB), ("TPU v3", 16 * GiB), ("TPU v4", 32 * GiB), ("TPU v5e", 16 * GiB),
    ("TPU v5p", 95 * GiB), ("TPU v6e", 32 * GiB), ("T4", 15360 * MiB), ("L4", 23034 * MiB),
    ("A100 40GB", 40960 * MiB), ("A100 80GB", 81920 * MiB), ("H100 80GB", 81559 * MiB), ("H200", 143771 * MiB),
)
# How a compiler turns traced shapes into bytes, per compiler. XLA:CPU (also used for GPUs: XLA:GPU's
# buffer assignment of the same steps is within 15%, ../notes gpu-compile-findings) was calibrated on its
# buffer assignment of the train step (36 configurations: lora/qlora/full x remat none/dots/full x 2 lengths
# x 2 shapes; worst error 12%) and is checked on another shape by tests/test_estimate.py;
# blocked_score_copies was refitted for 128-token blocks on that test's shape (estimate / XLA 0.87-1.20).
@dataclasses.dataclass(frozen=True)
class Calibration:
    name: str
    residuals_kept: float  # share of the traced residual bytes XLA keeps (fusion recomputes the rest)
    logit_copies: float  # float32 logits of one loss chunk: the logits and their cotangent
    layer_cotangents: float  # a layer's backward working set, relative to all its forward intermediates
    blocked_score_copies: float  # blocked attention's backward: score-sized arrays of all its blocks at once
    tied_copies: float = 2  # tied embeddings: the transposed output projection and its cotangent
    largest_kernel_copies: float = 2  # QLoRA: the largest dequantized kernel of a layer, in the compute dtype
    layer_kernels_f32: float = 0  # QLoRA: all of a layer's kernels dequantized in float32 at once (XLA:TPU)
    gathered_layers: float = 0  # weights sharded over fsdp/context: one layer's weights gathered, copies at once


CALIBRATIONS = {
    "cpu": Calibration("XLA:CPU", residuals_kept=0.82, logit_copies=2, layer_cotangents=0.55, blocked_score_copies=1.5),
    # fitted by bench/calibrate.py on libtpu 0.0.42.1's compiles: the 7 presets on v2-8 ... v6e-8 (37 that
    # compile, batch-raised rows included) and the long-context rows of docs/long-context.md (128k and
    # 512k with mesh.context, 32k without; `python bench/calibrate.py --figures bench/tpu_figures.json`):
    # estimate / compiler 0.92-1.12. XLA:TPU keeps every layer
    # input, dequantizes a QLoRA layer's kernels together in float32, holds a layer's weights gathered
    # over fsdp while it runs, and its splash kernels hold no scores.
    "tpu": Calibration("XLA:TPU", residuals_kept=1.05, logit_copies=2, layer_cotangents=0.45, blocked_score_copies=0,
                       tied_copies=0, largest_kernel_copies=0, layer_kernels_f32=1.5, gathered_layers=1),
}


def calibration(platform: str) -> Calibration:
    return CALIBRATIONS.get(platform, CALIBRATIONS["cpu"])


HEADROOM = 0.9  # fits = the estimate within 90% of the device: XLA's runtime, fragmentation, workspaces

# config.json of the models the bundled presets name, so that `jaxtune estimate` works offline.
KNOWN_ARCHITECTURES = {
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5),
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, rms_norm_eps=1e-5),
}
KNOWN_ARCHITECTURES["meta-llama/Meta-Llama-3-8B-Instruct"] = KNOWN_ARCHITECTURES["meta-llama/Meta-Llama-3-8B"]
KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B"] = dict(  # Llama 3 8B trained on to 128k positions
    KNOWN_ARCHITECTURES["meta-llama/Meta-Llama-3-8B"], max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192))


@dataclasses.dataclass
class Estimate:
    """Bytes per device, by part; `total` is their sum, `lines` the printable breakdown."""
    parts: dict
    details: dict
    devices: int
    mesh: dict
    remat: str  # the policy estimated
    remat_why: str = ""  # how model.remat='auto' resolved on this machine ('' when the config names a policy)
    notes: str = ""  # printed first: a bitsandbytes 4-bit base trained as stored, a length past the model's
    calibration: str = "XLA:CPU"  # whose buffer assignment the constants were fitted on
    phases: dict = dataclasses.field(default_factory=dict)  # the backward peak's candidates: loss, layer

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, capacity: float) -> bool:
        return self.total <= HEADROOM * capacity

    def text(self, devices_table: bool = True) -> str:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        how = " (model.remat='auto' as resolved here: set it to plan another device)" if self.remat_why else ""
        lines = [self.notes] if self.notes else []
        lines.append(f"memory per device (mesh {mesh}, {self.devices} device{'s' * (self.devices > 1)}, "
                     f"remat {self.remat!r}{how}; calibrated on {self.calibration}):")
        for name, size in self.parts.items():
            lines.append(f"  {name:<14} {size / GiB:8.2f} GiB   {self.details.get(name, '')}")
        lines.append(f"  {'total':<14} {self.total / GiB:8.2f} GiB")
        if not devices_table:
            return "\n".join(lines)
        fit = [name for name, cap in DEVICES if self.fits(cap)]
        short = [f"{name} ({cap / GiB:.0f})" for name, cap in DEVICES if not self.fits(cap)]
        lines.append(f"  fits (within {HEADROOM:.0%} of memory): {', '.join(fit) or 'none of the listed devices'}")
        if short:
            lines.append(f"  too small: {', '.join(short)} GiB")
        return "\n".join(lines)


class _MeshShape:
    """What `sharding.spec` needs of a mesh (its axis sizes), for a mesh that need not exist here."""

    def __init__(self, shape: dict):
        self.shape = shape


def read_architecture(model_path: str) -> dict:
    """config.json of `model_path`: a local directory, a preset's hub id (bundled), or from the hub."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        return read_hf_config(local)
    if model_path in KNOWN_ARCHITECTURES:
        return dict(KNOWN_ARCHITECTURES[model_path])
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model_path, "config.json")).read_text())
    except Exception as e:  # offline, gated or missing
        raise JaxtuneError(f"model.path {model_path}: not a local directory, not a bundled architecture "
                           f"({', '.join(sorted(KNOWN_ARCHITECTURES))}), and its config.json could not be "
                           f"fetched ({type(e).__name__}); download just config.json into a directory and "
                           "point model.path at it") from None


LONGEST_EXTENSION = 16  # data.seq_len beyond this many times the model's positions is refused as a mistake


def check_seq_len(seq_len: int, hf: dict, where: str) -> str:
    """'' when data.seq_len is within the positions the model was trained on, else a warning; a length far
    past them (a typo, 100000000) is refused here, in a second, instead of exhausting memory later."""
    limit = hf.get("max_position_embeddings")
    if not limit or seq_len <= limit:
        return ""
    if seq_len > LONGEST_EXTENSION * limit:
        raise JaxtuneError(f"data.seq_len={seq_len} is {seq_len / limit:,.0f}x the max_position_embeddings="
                           f"{limit} of {where}: lower it (up to {LONGEST_EXTENSION * limit:,} is accepted)")
    return (f"warning: data.seq_len={seq_len} is above the max_position_embeddings={limit} of {where}: positions "
            f"past {limit} were never trained and quality may drop there (a RoPE-scaled version of the model "
            "raises the limit in its config.json)")


def _nf4_placeholder(layers: int, out_in: tuple, opts: quant.QuantOptions) -> quant.NF4:
    """Zero arrays with the shapes and dtypes of a stacked NF4 weight (only ever traced abstractly)."""
    n = out_in[0] * out_in[1]
    blocks = -(-n // opts.blocksize)
    packed = jnp.zeros((layers, (n + 1) // 2), jnp.uint8)
    if not opts.double_quant:
        return quant.NF4(packed, jnp.zeros((layers, blocks), jnp.float32), out_in, opts.blocksize)
    return quant.NF4(packed, jnp.zeros((layers, blocks), jnp.uint8), out_in, opts.blocksize,
                     jnp.zeros((layers, -(-blocks // quant.NESTED_BLOCKSIZE)), jnp.float32),
                     jnp.zeros((layers,), jnp.float32))


@dataclasses.dataclass
class AbstractRun:
    """A run's model and optimizer state as shapes and dtypes: what the train step is compiled for."""
    model_cfg: ModelConfig
    graphdef: object
    trainable: nnx.State
    frozen: nnx.State
    tx: object
    opt_state: object
    notes: str = ""  # a bitsandbytes 4-bit base trained as stored (lora.quant_options); data.seq_len's warning


def abstract_run(cfg, platform: str | None = None, device_kind: str | None = None, context: int = 1) -> AbstractRun:
    """The run's model (NF4 kernels for QLoRA, LoRA attached) and optimizer state, without weights;
    the attention backend as `platform` (default: this machine's) resolves model.attention for rows split
    over `context` devices."""
    from jaxtune.train import optim

    hf = read_architecture(cfg.model.path)
    length_note = check_seq_len(cfg.data.seq_len, hf, cfg.model.path)
    local = Path(cfg.model.path).expanduser()
    opts, quant_note = lora.quant_options(cfg, hf, local if local.is_dir() else None)
    mcfg = config_from_hf(hf, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                          source=f"{cfg.model.path}/config.json")
    try:  # the backend training here would use; a kernel named for another platform is estimated as is
        backend, _ = attention.resolve(cfg.model.attention, cfg.data.seq_len, mcfg.sliding_window, platform,
                                       device_kind, context)
    except JaxtuneError:
        backend = cfg.model.attention
    mcfg = dataclasses.replace(mcfg, attention=backend)
    run = cfg.to_dict()
    init_from = run["lora"]["init_from"]
    if init_from:  # the adapter's rank and targets win, as in training
        adapter = json.loads((Path(init_from) / "adapter_config.json").read_text())
        targets = adapter["target_modules"]
        run["lora"] = dict(run["lora"], init_from="", rank=adapter["r"],
                           targets=",".join(targets) if isinstance(targets, list) else "all-linear")

    def build():
        model = Llama(mcfg, rngs=nnx.Rngs(0))
        for name in opts.modules if opts else ():
            linear = getattr(model.layers, name)
            layers, d_in, d_out = linear.kernel.shape
            if not quant_note:  # a dense base, quantized as quant.* says (a 4-bit one was checked when stored)
                quant.check_rows(f"{cfg.model.path}: {hf_name(('layers', name, 'kernel'), 0)}", d_in, opts.blocksize,
                                 module=name, block_key="quant.block_size=", dense_key="quant.dense_modules=")
            linear.kernel = NF4Kernel(_nf4_placeholder(layers, (d_out, d_in), opts), linear.kernel.axes)
        lora.attach_from_config(model, run)
        return model

    graphdef, trainable, frozen = lora.split_trainable(nnx.eval_shape(build), cfg.method, cfg.lora.modules_to_save)
    tx = optim.optimizer(optax.constant_schedule(1e-4), weight_decay=cfg.train.weight_decay,
                         max_grad_norm=cfg.train.max_grad_norm, b1=cfg.train.b1, b2=cfg.train.b2,
                         grad_accum_steps=cfg.train.grad_accum_steps)
    return AbstractRun(mcfg, graphdef, trainable, frozen, tx, jax.eval_shape(tx.init, trainable),
                       "\n".join(note for note in (length_note, quant_note) if note))


def per_device_bytes(state, mesh) -> dict:
    """{dtype name: bytes per device} of an abstract state, sharded as the run shards it (by each
    Variable's logical axes; other leaves, e.g. step counters, replicated)."""
    totals = {}

    def one(leaf):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        axes = getattr(leaf, "axes", None) or (None,) * len(value.shape)
        ways = 1
        for entry in sharding.spec(axes, value.shape, mesh):
            for axis in (entry,) if isinstance(entry, str) else (entry or ()):
                ways *= mesh.shape[axis]
        name = "nf4 (codes + scales)" if isinstance(leaf, QuantizedArray) else np.dtype(value.dtype).name
        totals[name] = totals.get(name, 0) + value.size * np.dtype(value.dtype).itemsize // ways

    jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return totals


def residual_bytes(fn, *args, per_layer: int) -> tuple[int, int]:
    """Bytes that the backward of `fn` (which returns `jax.vjp(...)`'s (out, vjp_fn)) keeps from its
    forward beyond its own arguments, read off the traced jaxpr, split in two: residuals that depend on
    the first `per_layer` arguments (a scanned layer's input and weights: stacked once per layer) and
    the rest (e.g. the attention mask broadcast: loop-invariant, which the layer scan keeps once)."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr = closed.jaxpr
    n_res = len(jax.tree.leaves(shapes[1]))
    n_per_layer = len(jax.tree.leaves(args[:per_layer]))
    varying = set(jaxpr.invars[:n_per_layer])
    for eqn in jaxpr.eqns:
        if any(v in varying for v in eqn.invars if not hasattr(v, "val")):
            varying.update(eqn.outvars)
    given = set(jaxpr.invars) | set(jaxpr.constvars)
    kept = {v for v in jaxpr.outvars[len(jaxpr.outvars) - n_res:] if not hasattr(v, "val") and v not in given}
    size = lambda vs: sum(v.aval.size * np.dtype(v.aval.dtype).itemsize for v in vs)
    return size(kept & varying), size(kept - varying)


def layer_residual_bytes(run: AbstractRun, cfg, batch: int, seq: int, remat: str, cp: int = 1) -> tuple[int, int]:
    """(per-layer, loop-invariant) bytes one decoder layer keeps for its backward under `remat`, for a
    micro-batch [batch, seq] per device (its input, which the layer scan stacks anyway, not included);
    with rows split over `cp` devices, the layer one of them runs (jaxtune.context.stand_in).

    "xla" attention keeps its [B, H, T, T] probabilities; the fused kernels (cudnn, pallas, splash)
    keep q, k, v, their output and a log-sum-exp, as their stand-ins do (they trace on any platform)."""
    mcfg = run.model_cfg
    if mcfg.attention not in ("xla", "blocked"):
        mcfg = dataclasses.replace(mcfg, attention=attention.STAND_INS[mcfg.attention])
    model = nnx.merge(run.graphdef, run.trainable, run.frozen)
    graphdef, trainable, frozen = nnx.split(model.layers, lora.trainable_filter(cfg.method, cfg.lora.modules_to_save),
                                            ...)
    one_layer = functools.partial(jax.tree.map, lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype))
    inv_freq = rope_inv_freq(mcfg)
    dropout = cfg.method in lora.LORA_METHODS and cfg.lora.dropout > 0

    def forward_and_vjp(x, trainable, frozen, rng, positions, mask):
        rope = rope_tables(positions, inv_freq, x.dtype)  # outside the layer, as in Llama.hidden_states

        def body(x, trainable):
            layer = nnx.merge(graphdef, trainable, frozen)
            segments = positions  # shape only (the values are never computed here)
            return layer(x, mcfg, positions, segments, mask, rope, rng=rng if dropout else None)[0]

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return jax.vjp(body, x, trainable)

    mask = jax.ShapeDtypeStruct((batch, seq, seq), jnp.bool_) if mcfg.attention == "xla" and cp == 1 else None
    with context.stand_in(cp):
        return residual_bytes(forward_and_vjp, jax.ShapeDtypeStruct((batch, seq, mcfg.hidden_size),
                                                                    jnp.dtype(mcfg.dtype)),
                              one_layer(trainable), one_layer(frozen), jax.random.key(0),
                              jax.ShapeDtypeStruct((batch, seq), jnp.int32), mask, per_layer=4)


def _layer_weight_bytes(state, itemsize: int | None = None) -> int:
    """Bytes of one decoder layer's weights in `state` (its `layers` leaves are stacked over the layers),
    as stored or at `itemsize` bytes per element."""
    if "layers" not in state:
        return 0
    leaves = jax.tree.leaves(state["layers"])
    return sum(leaf.size * (itemsize or np.dtype(leaf.dtype).itemsize) // leaf.shape[0] for leaf in leaves)


def _dequantized_kernels(run: AbstractRun) -> list[int]:
    """Elements of each NF4 kernel of one layer (QLoRA dequantizes a layer's kernels for its matmuls)."""
    model = nnx.merge(run.graphdef, run.trainable, run.frozen)
    return [math.prod(m.kernel.shape[1:]) for m in vars(model.layers).values() if isinstance(
        getattr(m, "kernel", None), NF4Kernel)]


def device_memory() -> int | None:
    """Bytes one local device can hold: what the accelerator reports, or host RAM shared by the CPU devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg, model_dir: str) -> Estimate:
    """`jaxtune train`'s look before it loads: resolve model.remat, print the estimate, and warn when
    this device is smaller. The run uses `.remat` of the returned estimate."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.model.path = str(model_dir)
    est = estimate(cfg)
    print(f"remat: {est.remat_why or repr(est.remat) + ' (model.remat)'}")
    print(est.text(devices_table=False))
    limit = device_memory()
    if limit and est.total > limit:
        remat = "" if est.remat == "full" else "set model.remat='full', "
        print(f"WARNING: the run needs about {est.total / GiB:.1f} GiB per device and this device has "
              f"{limit / GiB:.1f} GiB: it will probably run out of memory. Lower train.micro_batch_size (and raise "
              f"train.grad_accum_steps) or data.seq_len, {remat}or use method='qlora'. `jaxtune estimate` shows the parts.")
    return est


# model.remat = "auto" on CPU. Measured (bench/train.py --seq 512, LoRA on SmolLM2-135M, 2 cores): 'dots'
# is faster than keeping everything (saving a layer's activations into the scan's stacked buffers costs
# more there than recomputing its element-wise ops) and needs 22% less memory.
CPU_REMAT = "dots"


def with_remat(cfg, policy: str):
    """A copy of `cfg` with model.remat = policy."""
    cfg = cfg.copy_and_resolve_references()
    cfg.model.remat = policy
    return cfg


def estimate(cfg, devices: int | None = None, platform: str | None = None, capacity: int | None = None,
             device_kind: str | None = None) -> Estimate:
    """Memory per device of the run `cfg` on `devices` devices (default: those visible here) of
    `platform` (default: this machine's; it picks the attention kernel and the calibration).
    model.remat='auto' resolves: CPU_REMAT on CPU; on an accelerator the least recomputation that fits
    `capacity` bytes (default: this device's) — 'none', the fastest, else 'dots', else 'full', else 'offload'
    (each layer's input in host memory)."""
    if platform is None:  # this machine: its device kind decides too (no splash on TPU v2/v3)
        platform, device_kind = jax.default_backend(), device_kind or jax.devices()[0].device_kind
    if cfg.model.remat != "auto":
        return _estimate(cfg, devices, platform, device_kind)
    if platform == "cpu":
        est = _estimate(with_remat(cfg, CPU_REMAT), devices, platform, device_kind)
        return dataclasses.replace(est, remat_why=f"auto: {CPU_REMAT!r} on CPU (recomputing element-wise ops is "
                                                  "faster there than keeping them)")
    limit = capacity or device_memory()
    for policy in ("none", "dots", "full", "offload"):
        est = _estimate(with_remat(cfg, policy), devices, platform, device_kind)
        if limit is None or est.fits(limit):
            return dataclasses.replace(est, remat_why=f"auto: {policy!r}, the least recomputation that fits "
                                                      f"({est.total / GiB:.1f} GiB per device)")
    return dataclasses.replace(est, remat_why="auto: 'offload' (the most recomputation, the stream in host memory; "
                                              "even it may not fit)")


def _estimate(cfg, devices: int | None, platform: str, device_kind: str | None = None) -> Estimate:
    """`estimate` of a config that names its remat policy."""
    from jaxtune.train.step import chunk_size

    devices = devices or jax.device_count()
    mesh = _MeshShape(sharding.mesh_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices, cfg.mesh.context))
    run = abstract_run(cfg, platform, device_kind, mesh.shape["context"])
    mcfg = run.model_cfg
    frozen, trainable = per_device_bytes(run.frozen, mesh), per_device_bytes(run.trainable, mesh)
    optimizer = per_device_bytes(run.opt_state, mesh)
    sharding.check_batch(cfg.train.micro_batch_size, mesh.shape)
    batch_ways, cp = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["context"]
    b, t, tensor = cfg.train.micro_batch_size // batch_ways, cfg.data.seq_len // cp, mesh.shape["tensor"]  # per device
    act = jnp.dtype(mcfg.dtype).itemsize
    d, v = mcfg.hidden_size, mcfg.vocab_size
    cal = calibration(platform)
    stream = b * t * d * act  # the residual stream each layer's backward starts from
    offloaded = mcfg.remat in HOST_OFFLOAD  # the stream in host memory; on the device, as 'full'
    policy = "full" if offloaded else mcfg.remat
    kept, invariant = (n // tensor for n in layer_residual_bytes(run, cfg, b, t, policy, cp))
    every = kept if policy == "none" else layer_residual_bytes(run, cfg, b, t, "none", cp)[0] // tensor
    activations = mcfg.num_layers * (stream * (not offloaded) + int(cal.residuals_kept * kept)) + invariant
    # Two phases that are never live together: the loss (chunk by chunk, before the layers' backward)
    # and one layer's backward (its forward recomputed where remat dropped it, and its cotangents).
    chunk = chunk_size(t * cp, cfg.train.loss_chunk, multiple_of=cp) // cp  # a chunk spans the context shards
    loss = int(cal.logit_copies * b * chunk * v * 4) // tensor + 2 * b * t * d * 4
    loss += int(cal.tied_copies * v * d * act) // tensor if mcfg.tie_word_embeddings else 0
    if mesh.shape["fsdp"] > 1:  # the output projection, gathered once over fsdp, held through the loss
        loss += v * d * act // tensor
    layer = (every - kept if mcfg.remat != "none" else 0) + int(cal.layer_cotangents * every)
    if cfg.method == "qlora":
        kernels = _dequantized_kernels(run)
        layer += int(cal.largest_kernel_copies * max(kernels, default=0) * act)
        layer += int(cal.layer_kernels_f32 * sum(kernels) * 4)
    if mesh.shape["fsdp"] * cp > 1:  # the layer's weights gathered for its matmuls (the scan prefetches the next
        # layer's), and the trained ones' float32 gradients at that size until they are reduce-scattered
        weights = _layer_weight_bytes(run.trainable) + _layer_weight_bytes(run.frozen)
        layer += int(cal.gathered_layers * weights) // tensor
        layer += _layer_weight_bytes(run.trainable, itemsize=4) // tensor
    unembed = "embed" if mcfg.tie_word_embeddings else "lm_head"
    if mesh.shape["fsdp"] > 1 and unembed in {path[0] for path, _ in nnx.to_flat_state(run.trainable)}:
        # its float32 gradient at the gathered size, reduce-scattered while the layers' backward runs
        # (Llama-3-8B full fine-tuning on v4-32: the TPU compiler's 21.25 GiB, 19.36 without this)
        layer += v * d * 4 // tensor
    heads = -(-mcfg.num_heads // tensor)
    if cp > 1 and mcfg.attention == "blocked":  # one query block's float32 scores against the whole row, and
        # their cotangents (splash keeps O(T))
        layer += 2 * b * heads * context.query_block(t // 2, t * cp) * t * cp * 4
    elif cp == 1 and mcfg.attention == "blocked":  # its query blocks' backward runs side by side (the kernels' do not)
        layer += int(cal.blocked_score_copies * b * heads * attention.blocked_score_elements(t, mcfg.sliding_window) * 4)
    parts = {
        "frozen": sum(frozen.values()),
        "trainable": sum(trainable.values()),
        "optimizer": sum(optimizer.values()),
        "gradients": sum(trainable.values()),
        "activations": activations,
        "backward peak": max(loss, layer),
    }
    show = lambda sizes: ", ".join(f"{k} {n / GiB:.2f}" for k, n in sorted(sizes.items())) + " GiB" if sizes else ""
    details = {
        "frozen": show(frozen),
        "trainable": show(trainable),
        "optimizer": f"AdamW moments + MultiSteps' gradient accumulator: {show(optimizer)}",
        "gradients": "one gradient of the trainable weights",
        "activations": f"micro-batch {b} x {t} per device; {mcfg.num_layers} layers x ({stream / MiB:.1f} MiB "
                       f"stream{' in host memory' * offloaded} + {cal.residuals_kept * kept / MiB:.1f} MiB kept by "
                       f"remat={mcfg.remat!r}, attention={mcfg.attention!r})",
        "backward peak": f"the larger of the loss ({loss / MiB:.0f} MiB: float32 logits of {b} x {chunk} tokens "
                         f"x {v}, train.loss_chunk={cfg.train.loss_chunk}) and one layer's backward "
                         f"({layer / MiB:.0f} MiB{': its forward again, remat dropped it' * (mcfg.remat != 'none')})",
    }
    used = math.prod(mesh.shape.values())
    idle = (f"note: the config's mesh uses {used} of the {devices} devices (the others would idle); set one of "
            "mesh.data/fsdp/context/tensor to -1 to shard over all of them") * (used < devices)
    return Estimate(parts, details, devices, dict(mesh.shape), mcfg.remat, calibration=cal.name,
                    notes="\n".join(filter(None, [run.notes, idle])), phases={"loss": loss, "layer": layer})
