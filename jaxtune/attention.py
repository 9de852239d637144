"""Causal self-attention over packed rows, behind one function with several backends.

`model.attention` picks one: "xla" (the einsum reference: any backend, materialises the B x H x T x T
scores), "blocked" (pure JAX: 128-token query blocks against only the key blocks they can see, each block
rematerialised in the backward, so about half the work and no T x T residual per layer), "cudnn"
(`jax.nn.dot_product_attention(implementation="cudnn")`, GPU), "pallas" (the Pallas flash kernel
with segment ids, `jax.experimental.pallas.ops.gpu.attention`, GPU) and "splash" (splash attention
with segment ids, `jax.experimental.pallas.ops.tpu.splash_attention`, TPU); "auto" picks the best the
platform runs.

Every backend computes the same thing: a query attends to the keys of its own document (same
non-zero segment id) at or before it, within the sliding window when the model has one; query head
h reads key/value head h // (H / K) (grouped-query attention). Rows are packed with documents
contiguous, so "before" by index equals "before" by position here. Padding (segment 0) attends to
nothing in "xla"/"blocked" and to other padding in the kernels: its outputs differ and carry no loss.
The KV-cache path of generation always uses "xla" with an explicit mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.errors import JaxtuneError

BACKENDS = ("auto", "xla", "blocked", "cudnn", "pallas", "splash")
PLATFORMS = {"xla": None, "blocked": None, "cudnn": ("gpu",), "pallas": ("gpu",), "splash": ("tpu",)}
BLOCKED_BLOCK = 128  # fastest of 64..512 at T = 512 and 2048 on CPU (forward + backward)
NEG_INF = float(jnp.finfo(jnp.float32).min)


NO_SPLASH = ("TPU v2", "TPU v3")  # Mosaic has no bfloat16 matmul there (E2001, found by jaxtune compile)


def resolve(name: str, seq_len: int, window: int | None, platform: str | None = None,
            device_kind: str | None = None, context: int = 1) -> tuple[str, str]:
    """(backend, why) for `model.attention = name` on this platform (default: this machine's, and its
    device kind); an explicit choice the platform cannot run is an error naming the key, "auto" never fails.
    With rows split over `context` devices (mesh.context) attention is jaxtune.context's, with splash or
    the blocked einsum on each device's queries."""
    if platform is None:
        platform, device_kind = jax.default_backend(), device_kind or jax.devices()[0].device_kind
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if name not in BACKENDS:
        raise JaxtuneError(f"model.attention must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "splash" and device_kind in NO_SPLASH:
        raise JaxtuneError(f"model.attention='splash' does not compile on {device_kind} (no bfloat16 matmul in "
                           "its Pallas kernels); use 'auto' (blocked there)")
    if context > 1:
        return _resolve_context(name, seq_len, window, platform, device_kind, context)
    if name == "auto":
        if platform == "tpu" and seq_len % 128 == 0 and device_kind not in NO_SPLASH:
            return "splash", "auto: splash attention on TPU"
        if platform == "gpu":
            if window is None and seq_len % 64 == 0:
                return "pallas", "auto: Pallas flash attention with segment ids on GPU"
            why = "sliding window" if window is not None else f"T={seq_len} is not a multiple of 64"
            return "cudnn", f"auto: cuDNN flash attention on GPU ({why}: not in the Pallas kernel)"
        if seq_len >= BLOCKED_BLOCK:  # faster than the einsum from T = 128
            return "blocked", f"auto: blocked causal attention ({blocks_text(seq_len, window)}) on {platform}"
        return "xla", f"auto: XLA einsum attention on {platform} (T={seq_len} is short)"
    allowed = PLATFORMS[name]
    if allowed is not None and platform not in allowed:
        raise JaxtuneError(f"model.attention={name!r} runs on {'/'.join(allowed)}, not {platform}; use 'auto' "
                           "(or 'xla', which runs anywhere)")
    if name == "blocked":
        return name, f"blocked (model.attention): {blocks_text(seq_len, window)}"
    return name, f"{name} (model.attention)"


def _resolve_context(name, seq_len, window, platform, device_kind, cp) -> tuple[str, str]:
    """`resolve` for rows split over `cp` devices (jaxtune.context): splash on TPU where its tiles fit each
    device's share, else the blocked einsum against the gathered keys; cudnn/pallas do not run there."""
    from jaxtune import context

    context.check_length(seq_len, cp)
    splash_fits = platform == "tpu" and device_kind not in NO_SPLASH and (seq_len // cp) % 128 == 0
    if name in ("cudnn", "pallas"):
        raise JaxtuneError(f"model.attention={name!r} does not run with mesh.context={cp}; use 'auto' (the blocked "
                           "einsum against the gathered keys there)")
    if name == "splash":
        if platform != "tpu":
            raise JaxtuneError(f"model.attention='splash' runs on tpu, not {platform}; use 'auto' (or 'xla', which "
                               "runs anywhere)")
        context.check_splash(seq_len, cp)
    backend = "splash" if name == "splash" or (name == "auto" and splash_fits) else "blocked"
    how = ("splash attention on each device's queries with a load-balanced causal mask" if backend == "splash" else
           "each device's queries in blocks against the keys they can see")
    return backend, (f"context parallelism over {cp} devices: keys and values all-gathered (zigzag layout), {how}"
                     + ("" if window is None else f", sliding window {window}"))


def blocks_text(seq_len: int, window: int | None) -> str:
    """What the blocked attention does at this length, for the run log."""
    spans = _blocks(seq_len, window)
    if spans is None:
        return f"T={seq_len} is too short to split into 16-token blocks: the einsum"
    block, padded = spans[0][0].stop, spans[-1][0].stop
    return f"{block}-token blocks" + (f", the last padded: T={seq_len} -> {padded}" if padded > seq_len else "")


def mask(q_pos, q_seg, kv_pos, kv_seg, window: int | None) -> jax.Array:
    """[B, T, S] boolean: same non-zero segment, causal by position, inside the sliding window.

    q_* are the queries' positions and segment ids [B, T], kv_* those of the keys/values [B, S].
    Segment 0 marks padding (and empty cache slots). Causality by position rather than by index
    serves packed rows (positions restart per document) and the KV cache alike.
    """
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    causal = kv_pos[:, None, :] <= q_pos[:, :, None]
    allowed = same & causal
    if window is not None:
        allowed &= q_pos[:, :, None] - kv_pos[:, None, :] < window
    return allowed


def masked(q_bthd, keys_bskd, values_bskd, mask_bts) -> jax.Array:
    """The einsum reference with an explicit [B, T, S] mask; returns [B, T, H * D].

    Queries, keys and values are transposed once to [B, K, G·T, D] / [B, K, S, D] (small: T×H×D),
    so both products are plain batched matmuls; written as "BTKGD,BSKD->BKGTS" XLA:CPU copies the
    T×S scores to another layout instead, forward and backward (1.6x slower). The scale goes on the
    queries (T×D elements) rather than on the scores (T×S), the mask is added as a bias, and the
    softmax is normalised after the product with the values (T×D divisions, not T×S): on CPU the
    forward and backward of the T×S element-wise work was most of attention's time."""
    b, t, h, d = q_bthd.shape
    kv_heads = keys_bskd.shape[2]
    g = h // kv_heads
    q = (q_bthd * d**-0.5).reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    keys, values = keys_bskd.transpose(0, 2, 1, 3), values_bskd.transpose(0, 2, 1, 3)
    scores = jnp.einsum("BKMD,BKSD->BKMS", q, keys, preferred_element_type=jnp.float32)
    bias = jnp.where(mask_bts, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]
    scores = scores.reshape(b, kv_heads, g, t, -1) + bias
    unnormalized = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = jnp.einsum("BKMS,BKSD->BKMD", unnormalized.astype(values.dtype).reshape(b, kv_heads, g * t, -1), values,
                     preferred_element_type=jnp.float32).reshape(b, kv_heads, g, t, d) / total
    return out.astype(q_bthd.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)


def attend(backend: str, q_bthd, keys_btkd, values_btkd, positions_bt, segments_bt, window: int | None,
           mask_btt=None) -> jax.Array:
    """Self-attention of a packed row with the resolved `backend`; returns [B, T, H * D].
    `mask_btt` (xla only) is the mask built once outside the layer scan. On a mesh with a `context` axis
    the rows are split over it (jaxtune.context), whatever the backend."""
    from jaxtune import context

    if context.size() > 1:
        return context.attend(q_bthd, keys_btkd, values_btkd, positions_bt, segments_bt, window, backend)
    if backend == "xla":
        if mask_btt is None:
            mask_btt = mask(positions_bt, segments_bt, positions_bt, segments_bt, window)
        return masked(q_bthd, keys_btkd, values_btkd, mask_btt)
    impl = {"blocked": _blocked, "cudnn": _cudnn, "pallas": _pallas_gpu, "splash": _splash,
            **{name: functools.partial(_kernel_stand_in, repeat=name == STAND_INS["splash"])
               for name in set(STAND_INS.values())}}[backend]
    if backend in KERNELS:
        impl = per_shard(impl)
    b, t, h, d = q_bthd.shape
    return impl(q_bthd, keys_btkd, values_btkd, positions_bt, segments_bt, window).reshape(b, t, h * d)


# What `jaxtune estimate` traces in place of each fused kernel (not config values): their memory
STAND_INS = {"cudnn": "stand_in_gqa", "pallas": "stand_in_repeated_kv", "splash": "stand_in_repeated_kv"}
KERNELS = ("pallas", "splash")  # Pallas kernels: the SPMD partitioner cannot split them, a shard_map must


def per_shard(impl):
    """`impl` run on each device's own rows and heads inside a `shard_map` over the active mesh.

    XLA cannot partition a Mosaic/Triton custom call ("Mosaic kernels cannot be automatically
    partitioned"), so on a mesh each device calls the kernel on its slice: rows split as the batch is
    (data x fsdp), heads as the tensor axis splits them. Keys and values are repeated to the query
    heads first, so a query head and its key/value head always land on the same device, whatever
    tensor does to the KV heads. Without a mesh (or on one device) it is `impl` itself."""
    from jaxtune import sharding

    def wrapped(q, k, v, positions, segments, window, **kwargs):
        mesh = sharding.active_mesh()
        if mesh is None or mesh.size == 1:
            return impl(q, k, v, positions, segments, window, **kwargs)
        k, v = _repeat_kv(q, k, v)
        heads = sharding.spec(("batch", "length", "heads", None), q.shape, mesh)
        rows = sharding.spec(("batch", "length"), positions.shape, mesh)
        local = functools.partial(impl, window=window, **kwargs)
        return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, rows, rows), out_specs=heads,
                             check_vma=False)(q, k, v, positions, segments)

    return wrapped


def _blocks(t: int, window: int | None, block: int = BLOCKED_BLOCK) -> list[tuple[slice, slice]] | None:
    """(query slice, key slice) per query block of the blocked attention, over T rounded up to whole
    blocks (the last one padded); None for rows too short to split (T < 32: the einsum)."""
    block = min(block, t // 2)
    if block < 16:
        return None
    spans = []
    for i in range(-(-t // block)):
        lo = 0 if window is None else max(0, (i * block - window + 1) // block)
        spans.append((slice(i * block, (i + 1) * block), slice(lo * block, (i + 1) * block)))
    return spans


def blocked_score_elements(t: int, window: int | None) -> int:
    """Scores per (row, head) the blocked attention computes: about half of T x T when causal. XLA
    runs the query blocks' backward side by side, so that many float32 scores live at once there."""
    spans = _blocks(t, window)
    return t * t if spans is None else sum((q.stop - q.start) * (k.stop - k.start) for q, k in spans)


def _blocked(q, k, v, positions, segments, window, block: int = BLOCKED_BLOCK):
    """Query block i against key blocks lo..i only (the rest is masked anyway); each query block is a
    `jax.checkpoint`, so no layer keeps its scores for the backward (the T x T residual of the
    einsum). Rows shorter than two blocks use blocks of T/2; a T that is not a multiple of the block
    is padded to one with segment 0 (masked as keys, dropped as queries), never run as the einsum."""
    t = q.shape[1]
    spans = _blocks(t, window, block)
    if spans is None:
        return masked(q, k, v, mask(positions, segments, positions, segments, window))
    padded = spans[-1][0].stop
    if padded > t:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, positions, segments = map(pad, (q, k, v, positions, segments))

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_block(q_i, k_i, v_i, qpos, qseg, kpos, kseg):
        return masked(q_i, k_i, v_i, mask(qpos, qseg, kpos, kseg, window))

    outs = []
    for qs, ks in spans:
        outs.append(one_block(q[:, qs], k[:, ks], v[:, ks], positions[:, qs], segments[:, qs], positions[:, ks],
                              segments[:, ks]))
    out = jnp.concatenate(outs, axis=1)
    return out[:, :t] if padded > t else out


def _kernel_stand_in(q, k, v, positions, segments, window, repeat: bool):
    """The einsum, keeping for its backward what a fused kernel keeps: q, k and v (`repeat`ed to the query
    heads where jaxtune calls the kernel so: splash, pallas), the output and a float32 log-sum-exp per query
    and head. `jaxtune estimate` traces it in the kernels' place (they do not trace on every platform); the
    blocked einsum would stand in badly, its query blocks keep their key prefixes (T^2 / 256 keys). Its
    backward is never run."""
    b, t, h, d = q.shape

    @jax.custom_vjp
    def kernel(q, k, v):
        return masked(q, k, v, mask(positions, segments, positions, segments, window))

    def forward(q, k, v):
        out = kernel(q, k, v)
        kept_k, kept_v = _repeat_kv(q, k, v) if repeat else (k, v)
        return out, (q, kept_k, kept_v, out, jnp.zeros((b, h, t), jnp.float32))

    def backward(residuals, g):
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)

    kernel.defvjp(forward, backward)
    return kernel(q, k, v)


def _cudnn(q, k, v, positions, segments, window, implementation="cudnn"):
    """cuDNN's fused attention: causal + sliding window natively, documents by a [B, 1, T, T] mask
    (grouped-query heads natively too). `implementation` is a parameter so CPU tests can run the same
    call through XLA."""
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
    return jax.nn.dot_product_attention(q, k, v, mask=same[:, None], is_causal=True,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation=implementation)


def _repeat_kv(q, k, v):
    groups = q.shape[2] // k.shape[2]
    return jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)


def _pallas_gpu(q, k, v, positions, segments, window, interpret: bool = False):
    """The Pallas (Triton) flash kernel of jax.experimental: causal by index, documents by segment ids.
    It has no sliding window (`resolve` sends those to cuDNN) and one head count for q, k, v."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    if window is not None:
        raise ValueError("model.attention='pallas' has no sliding window; use 'cudnn' or 'auto'")
    k, v = _repeat_kv(q, k, v)
    t = q.shape[1]
    block = gpu_attention.BlockSizes(block_q=min(64, t), block_k=min(64, t), block_q_dkv=min(32, t),
                                     block_kv_dkv=min(32, t), block_q_dq=min(32, t), block_kv_dq=min(32, t))
    return gpu_attention.mha(q, k, v, segments, sm_scale=q.shape[-1] ** -0.5, causal=True, block_sizes=block,
                             interpret=interpret)


def _splash(q, k, v, positions, segments, window, interpret: bool = False):
    """TPU splash attention, one kernel per example (vmapped over the batch): a causal (or local,
    for a sliding window) mask whose fully masked blocks are skipped, documents by segment ids."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, d = q.shape
    k, v = _repeat_kv(q, k, v)
    shape = (t, t)
    head_mask = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), offset=0)
    block = min(512, t // 2) if t >= 256 else t  # splash tiles are multiples of 128
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * h), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    scale = d**-0.5
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731 - [B, T, H, D] -> [B, H, T, D]
    out = jax.vmap(lambda qi, ki, vi, si: kernel(qi, ki, vi, segment_ids=splash.SegmentIds(si, si)))(
        to_heads(q * scale), to_heads(k), to_heads(v), segments)
    return jnp.swapaxes(out, 1, 2)
