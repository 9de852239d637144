"""`jaxtune train`: a recipe to read top to bottom, one function per phase.

    setup_data       records -> packed rows, with the preflight (before any model loads)
    open_run_dir     the workdir's checkpoints; a resume must be the same run (identity)
    setup_model      the mesh, the model streamed onto it, LoRA attached, trainable ⟂ frozen
    setup_optimizer  steps, learning rate, the optax chain and its sharded state
    compile_steps    the jitted train / eval steps with explicit shardings
    restore          the newest checkpoint that verifies, or a fresh start (baseline eval)
    run              the loop: steps, logging, eval, early stopping, checkpoints, signals
    finish           curves.png, summary.json, the diagnosis, a reply

Each phase is a function a notebook can call; `train` calls them in order. What the loop changes
(step, best eval, last saved step, why it stopped) lives in one `LoopState`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import attention, context, distributed, lora, sharding
from jaxtune.atomic import write_text
from jaxtune.config import flatten, split_list
from jaxtune.data import loader, packing
from jaxtune.data.formats import FormatOptions
from jaxtune.errors import JaxtuneError
from jaxtune.estimate import check_fits, check_seq_len
from jaxtune.models.hf import config_from_hf, from_pretrained, load_tokenizer, read_hf_config, resolve_model_path
from jaxtune.models.llama import HOST_OFFLOAD, parameter_count
from jaxtune.paths import run_path
from jaxtune.train import curves, optim, run_dir
from jaxtune.train.checkpoint import Checkpoints
from jaxtune.train.metrics import MetricsLog, points
from jaxtune.train.run_dir import WorkdirLock, check_writable
from jaxtune.train.step import make_eval_step, make_train_step


class StopSignal:
    """SIGTERM (preemptible TPU VMs), SIGINT and SIGHUP (the terminal or tmux session closed) ask the
    loop to checkpoint and exit at the next step."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Data:
    model_dir: str
    tokenizer: object
    packed: loader.PackedData


@dataclasses.dataclass
class Model:
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    vocab_size: int
    remat: str  # model.remat and model.attention as resolved for this platform ('auto' never)
    attention: str
    quant: dict | None = None  # the NF4 base as trained (a bitsandbytes base's own settings), for config.json
    estimate: object = None  # what `jaxtune estimate` said before loading (the compile is compared with it)


@dataclasses.dataclass
class Optimizer:
    tx: optax.GradientTransformation
    state: optax.OptState
    lr_schedule: optax.Schedule
    batches: loader.Batches
    steps: int  # optimizer updates in the whole run
    resolved: dict  # what the config resolved to (peak lr, steps, epochs, ...), recorded in config.json


@dataclasses.dataclass
class Steps:
    train_step: Callable  # (trainable, frozen, opt_state, batch, supervised_per_micro_step, rng) -> ...
    eval_step: Callable  # (trainable, frozen, batch) -> (loss sum, tokens)
    batch_sharding: NamedSharding
    flag_sharding: NamedSharding  # the stop flags: one per batch row
    batch_fields: tuple = ()
    feed: tuple = (0, 1)  # (this process's feed, feeds): sharding.row_feeds

    def to_device(self, local: dict) -> dict:
        """This process's rows -> global arrays over the mesh (in the zigzag order of jaxtune.context when
        the mesh splits rows over a `context` axis); each process puts only its own devices' pieces."""
        local = context.lay_out(local, dict(self.batch_sharding.mesh.shape).get("context", 1))
        return {name: self._global(self.batch_sharding, v) for name, v in local.items()}

    def stop_flags(self, rows: int, signal_number: int):
        """This process's stop request (a signal number, 0 = none) on each of its `rows` batch rows."""
        return self._global(self.flag_sharding, np.full(rows, signal_number, np.int32))

    def _global(self, sharding: NamedSharding, local: np.ndarray) -> jax.Array:
        """The global [rows x feeds, ...] array of which `local` holds this feed's rows."""
        feed, feeds = self.feed
        rows = local.shape[0]

        def piece(index):
            first = (index[0].start or 0) - feed * rows
            return local[(slice(first, first + len(range(*index[0].indices(rows * feeds)))), *index[1:])]

        return jax.make_array_from_callback((rows * feeds, *local.shape[1:]), sharding, piece)


@dataclasses.dataclass
class LoopState:
    """What the loop changes, in one place; a checkpoint records `step` and `best` (and the data state)."""
    step: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"eval_loss": math.inf, "step": None, "evals_since_best": 0})
    last_saved: int | None = None
    stop_reason: str | None = None
    stopped_by: str | None = None  # the signal that stopped the run, if one did


# --- the phases ---------------------------------------------------------------------------------------

def check_before_writing(cfg) -> None:
    """What the config and the model's config.json alone can refuse, before the workdir is touched or
    the data tokenized: an absurd data.seq_len, an attention kernel this platform lacks."""
    model_dir = str(resolve_model_path(cfg.model.path))
    hf = read_hf_config(model_dir)
    check_seq_len(cfg.data.seq_len, hf, model_dir)  # a length past the model's is a warning, in the estimate
    if cfg.model.remat in HOST_OFFLOAD and jax.default_backend() == "cpu":
        raise JaxtuneError(f"model.remat={cfg.model.remat!r} keeps each layer's input in host memory, and on CPU the "
                           "run is in host memory already (XLA:CPU has no such memory space): use 'full'")
    attention.resolve(cfg.model.attention, cfg.data.seq_len, config_from_hf(hf).sliding_window,
                      context=max(cfg.mesh.context, 1))  # -1 (the remaining devices) is checked with the mesh


def setup_data(cfg) -> Data:
    """Tokenize, hold out, pack and check the data: bad data fails before a big model loads."""
    model_dir = str(resolve_model_path(cfg.model.path))
    tokenizer = load_tokenizer(model_dir)
    opts = FormatOptions.from_config(cfg)
    packed = loader.build(split_list(cfg.data.train), model_dir, opts, val_sources=split_list(cfg.data.val),
                          val_fraction=cfg.data.val_fraction, seed=cfg.seed, progress=cfg.log.progress)
    print(f"train data:\n{packed.train_report.text()}")
    if packed.val_report is not None:
        print(f"validation data:\n{packed.val_report.text()}")
    packed.train_report.check()
    if packed.chat_template:  # the eval prompt goes through the template the run trains on
        tokenizer.chat_template = packed.chat_template
    return Data(model_dir, tokenizer, packed)


def open_run_dir(cfg, data: Data) -> tuple[Checkpoints, dict]:
    """(checkpoints, identity): a workdir with checkpoints must hold this same run; checked before
    anything is written or loaded."""
    workdir = run_path(cfg.workdir)
    identity = run_dir.identity(Path(data.model_dir), data.packed.train)
    checkpoints = Checkpoints(workdir, cfg.checkpoint.keep)
    if checkpoints.any():
        run_dir.check_resume(workdir, flatten(cfg.to_dict()), identity, split_list(cfg.resume.allow_changes))
        reached = max(checkpoints.last.all_steps(), default=0)
        if cfg.train.max_steps and cfg.train.max_steps < reached:  # config.json would then refuse the true value
            raise JaxtuneError(f"train.max_steps={cfg.train.max_steps} is below step {reached}, where the "
                               f"checkpoints in {workdir} already are: the run is past it; use a new workdir to "
                               "train fewer steps, or a max_steps of at least that")
    return checkpoints, identity


def setup_model(cfg, model_dir: str) -> Model:
    """The mesh, the weights streamed onto it, LoRA attached, and the trainable ⟂ frozen split."""
    mesh = sharding.config_mesh(cfg.mesh)
    sharding.check_batch(cfg.train.micro_batch_size, mesh.shape)
    sharding.row_feeds(mesh)  # a mesh no host can feed is refused before anything loads
    est = check_fits(cfg, model_dir)
    remat = est.remat
    hf = read_hf_config(model_dir)
    window = config_from_hf(hf).sliding_window
    backend, why = attention.resolve(cfg.model.attention, cfg.data.seq_len, window, context=mesh.shape["context"])
    print(f"attention: {why}")
    if cfg.model.verify:
        from jaxtune.export import verify_model

        verify_model(model_dir)
    opts, _ = lora.quant_options(cfg, hf, model_dir)  # check_fits printed its note
    model = from_pretrained(model_dir, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            remat=remat, attention=backend, mesh=mesh, quantize=opts)
    lora.attach_from_config(model, cfg.to_dict())
    n_total = parameter_count(model)
    graphdef, trainable, frozen = lora.split_trainable(model, cfg.method, cfg.lora.modules_to_save)
    trainable = jax.device_put(trainable, sharding.state_shardings(trainable, mesh))
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    print(f"model {model_dir}: {n_total:,} parameters, {n_trainable:,} trainable ({n_trainable / 1e6:.2f}M, "
          f"{cfg.method}), mesh {dict(mesh.shape)}")
    quant = None
    if opts:
        print(f"frozen base in NF4: {lora.describe_quant(opts)}")
        quant = {"block_size": opts.blocksize, "double_quant": opts.double_quant, "modules": list(opts.modules)}
    return Model(mesh, graphdef, trainable, frozen, model.cfg.vocab_size, remat, backend, quant, est)


def setup_optimizer(cfg, model: Model, data: Data) -> Optimizer:
    """Steps and epochs, the peak learning rate ('auto' prints its arithmetic), the optax chain, and
    its state sharded like the parameters it follows."""
    report = data.packed.train_report
    accum_steps = cfg.train.grad_accum_steps
    batches = loader.Batches(data.packed.train, cfg.train.micro_batch_size * accum_steps, seed=cfg.seed,
                             feed=sharding.row_feeds(model.mesh))
    steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * batches.steps_per_epoch))
    epochs = steps / batches.steps_per_epoch
    if cfg.train.lr == "auto":
        peak_lr, arithmetic = optim.auto_lr(cfg.train.base_lr, report.supervised_tokens, steps, epochs,
                                            cfg.train.pretrained_batch_tokens)
        print(arithmetic)
    else:
        peak_lr = float(cfg.train.lr)
    lr_schedule = optim.schedule(cfg.train.schedule, peak_lr, steps, cfg.train.warmup_steps)
    tx = optim.optimizer(lr_schedule, weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                         b1=cfg.train.b1, b2=cfg.train.b2, grad_accum_steps=accum_steps)
    state = jax.jit(tx.init, out_shardings=opt_shardings(tx, model))(model.trainable)
    resolved = {"peak_lr": peak_lr, "steps": steps, "epochs": epochs, "steps_per_epoch": batches.steps_per_epoch,
                "vocab_size": model.vocab_size, "supervised_tokens_per_epoch": report.supervised_tokens}
    return Optimizer(tx, state, lr_schedule, batches, steps, resolved)


def opt_shardings(tx: optax.GradientTransformation, model: Model):
    """Optimizer state placed like the parameter each moment follows (its leaves keep the parameter's
    logical axes), counters replicated: a bare `jit(tx.init)` would leave step counters on one device."""
    return sharding.state_shardings(jax.eval_shape(tx.init, model.trainable), model.mesh)


def compile_steps(cfg, model: Model, opt: Optimizer) -> Steps:
    """The train and eval steps with the shardings of the arrays they take. The train step is compiled
    here, once (the loop's calls reuse it), and what the compiler says is printed beside the estimate."""
    shardings_of = functools.partial(jax.tree.map, lambda x: x.sharding)
    steps = jit_steps(cfg, model.mesh, model.graphdef, opt.tx, shardings_of(model.trainable),
                      shardings_of(model.frozen), shardings_of(opt.state), packing.ROW_FIELDS)
    steps.feed = opt.batches.feed  # this process's rows, as the loader gives them
    from jaxtune import aot

    print(aot.compiled_summary(cfg, steps, model.trainable, model.frozen, opt.state, model.estimate))
    return steps


def jit_steps(cfg, mesh, graphdef, tx, trainable_s, frozen_s, opt_s, batch_fields: tuple) -> Steps:
    """The jitted train and eval steps: explicit shardings, and the train step donates the parameters
    and optimizer state it replaces. `jaxtune compile` builds the same steps for a device it lacks."""
    batch_sharding = sharding.named_sharding(("batch", "length"), (cfg.train.micro_batch_size, cfg.data.seq_len), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_s = {name: batch_sharding for name in batch_fields}
    flag_s = sharding.named_sharding(("batch",), (cfg.train.micro_batch_size,), mesh)

    def in_mesh(fn):
        @functools.wraps(fn)
        def wrapped(*args):
            with sharding.use_mesh(mesh):
                return fn(*args)
        return wrapped

    train_step = jax.jit(in_mesh(make_train_step(graphdef, tx, cfg.train.loss_chunk)), donate_argnums=(0, 2),
                         in_shardings=(trainable_s, frozen_s, opt_s, batch_s, replicated, replicated, flag_s),
                         out_shardings=(trainable_s, opt_s, replicated))
    eval_step = jax.jit(in_mesh(make_eval_step(graphdef, cfg.train.loss_chunk)),
                        in_shardings=(trainable_s, frozen_s, batch_s), out_shardings=replicated)
    return Steps(train_step, eval_step, batch_sharding, flag_s, batch_fields)


def restore(cfg, checkpoints: Checkpoints, model: Model, opt: Optimizer) -> LoopState:
    """Continue from the newest checkpoint that verifies (parameters, optimizer state, data position,
    best eval); a fresh start is step 0."""
    restored = checkpoints.restore_latest(model.trainable, opt.state)
    if restored is None:
        return LoopState()
    model.trainable, opt.state, meta = restored
    opt.batches.state = meta["data_state"]
    print(f"resumed from {run_path(cfg.workdir) / 'checkpoints'} at step {meta['step']}")
    return LoopState(step=meta["step"], best=meta["best"], last_saved=meta["step"])


def evaluate(cfg, model: Model, data: Data, steps: Steps) -> float:
    """Token-weighted loss over the validation rows (capped by eval.max_batches)."""
    feed, feeds = steps.feed
    rows = cfg.train.micro_batch_size // feeds
    mine = slice(feed * rows, (feed + 1) * rows)  # as the loader splits batches
    sums = [steps.eval_step(model.trainable, model.frozen, steps.to_device({k: v[mine] for k, v in b.items()}))
            for b in eval_batches(data.packed.val, cfg.train.micro_batch_size, cfg.eval.max_batches)]
    loss_sum, tokens = np.sum(jax.device_get(sums), axis=0)
    return float(loss_sum / max(tokens, 1))


def eval_batches(rows: packing.Packed | dict, batch: int, max_batches: int):
    """Fixed-shape batches over every validation row; the last is padded with zero-weight rows."""
    rows = packing.as_rows(rows)
    n = len(rows)
    starts = list(range(0, n, batch))[: max_batches or None]
    for s in starts:
        idx = np.arange(s, s + batch) % n
        chunk = rows.take(idx)
        chunk["weights"] = np.where((np.arange(s, s + batch) < n)[:, None], chunk["weights"], 0).astype(np.float32)
        yield chunk


def reply(cfg, model: Model, data: Data) -> str:
    """The model's answer to eval.prompt, greedy."""
    from jaxtune.generate import generate, prompt_ids, stop_token_ids

    tokenizer = data.tokenizer
    [ids] = generate(nnx.merge(model.graphdef, model.trainable, model.frozen),
                     [prompt_ids(tokenizer, cfg.eval.prompt, chat=bool(tokenizer.chat_template))],
                     max_new_tokens=cfg.eval.max_new_tokens, stop_ids=stop_token_ids(tokenizer, data.model_dir))
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class Loop:
    """The training loop over prepared phases: `run()` reads like the algorithm, the helpers below it
    say what one step, one log, one eval and one save do."""

    def __init__(self, cfg, data: Data, model: Model, opt: Optimizer, steps: Steps, checkpoints: Checkpoints,
                 state: LoopState, log: MetricsLog, *, progress: bool):
        self.cfg, self.data, self.model, self.opt, self.steps = cfg, data, model, opt, steps
        self.checkpoints, self.state, self.log, self.progress = checkpoints, state, log, progress
        self.window = None  # on-device metric sums since the last log step
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.host, self.loss = None, math.nan  # the window as read at the last log/eval/save step
        self.base_key = jax.random.key(cfg.seed)  # dropout: one key per micro-step, folded in
        self.flags = {}  # the step's stop-flag arrays by signal number (0: none)

    def run(self) -> LoopState:
        from tqdm import tqdm

        cfg, state, total = self.cfg, self.state, self.opt.steps
        bar = tqdm(total=total, initial=state.step, disable=not (self.progress and distributed.is_main()), unit="step",
                   dynamic_ncols=True)
        with StopSignal() as stop:
            while state.step < total and state.stop_reason is None:
                self.update(stop.received)
                state.step += 1
                bar.update(1)
                self.checkpoints.check()  # a failed background save stops the run now, not steps later
                # One process acts on a signal at once; several agree through the step's stop flags,
                # read with the loss at log/eval/save steps, so all of them save the same step.
                signalled = stop.received if jax.process_count() == 1 else None
                at_log = state.step % cfg.log.every_steps == 0 or state.step == total
                at_eval = (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0) or state.step == total
                at_save = state.step % cfg.checkpoint.every_steps == 0 or state.step == total or signalled
                if at_log or at_eval or at_save:
                    self.halt_unless_finite()
                    if int(self.host["stop"]) and jax.process_count() > 1:
                        signalled = at_save = signal.Signals(int(self.host["stop"])).name
                if at_log:
                    bar.set_postfix(self.log_window())
                if at_eval and self.data.packed.val is not None:
                    bar.write(self.eval_and_keep_best())
                if at_save or state.stop_reason:
                    self.save()
                if signalled and state.step < total:
                    by = " by a process of the job" if jax.process_count() > 1 else ""
                    state.stop_reason = f"{signalled} received{by}: checkpoint saved at step {state.step}; re-run to resume"
                    state.stopped_by = signalled
        bar.close()
        try:
            self.checkpoints.wait()
        finally:
            self.checkpoints.close()
        return state

    def update(self, signalled: str | None):
        """One optimizer update: k micro-steps whose loss is normalised by the supervised tokens of the
        whole global batch, so uneven micro-batches add up to exactly one big batch. `signalled` (the
        stop signal this process received) rides along as the step's stop flag."""
        cfg, model, opt = self.cfg, self.model, self.opt
        accum_steps = cfg.train.grad_accum_steps
        local, supervised = opt.batches.next_step()
        supervised_per_micro_step = jnp.float32(max(supervised, 1) / accum_steps)  # MultiSteps averages k grads
        rows = cfg.train.micro_batch_size // self.steps.feed[1]
        value = signal.Signals[signalled].value if signalled else 0
        if value not in self.flags:  # built once per value: no host-to-device copy on each step
            self.flags[value] = self.steps.stop_flags(rows, value)
        flags = self.flags[value]
        for i in range(accum_steps):
            chunk = {name: v[i * rows:(i + 1) * rows] for name, v in local.items()}
            self.window_tokens += int((chunk["segment_ids"] > 0).sum()) * self.steps.feed[1]
            rng = jax.random.fold_in(self.base_key, self.state.step * accum_steps + i)
            model.trainable, opt.state, metrics = self.steps.train_step(
                model.trainable, model.frozen, opt.state, self.steps.to_device(chunk), supervised_per_micro_step, rng,
                flags)
            self.window = metrics if self.window is None else {
                **metrics, "loss_sum": self.window["loss_sum"] + metrics["loss_sum"],
                "tokens": self.window["tokens"] + metrics["tokens"]}

    def halt_unless_finite(self):
        """Read the window's sums (the only host round trip, at log/eval/save steps); a NaN/Inf loss or
        parameter stops the run before a poisoned update can be checkpointed."""
        self.host = jax.device_get(self.window)
        self.loss = float(self.host["loss_sum"] / max(self.host["tokens"], 1))
        param_norm = float(self.host["param_norm"])
        if math.isfinite(self.loss) and math.isfinite(param_norm):
            return
        self.checkpoints.wait()
        state = self.state
        what = f"loss is {self.loss}" if not math.isfinite(self.loss) else f"the parameters became {param_norm}"
        kept = (f"The last good checkpoint (step {state.last_saved}) in {run_path(self.cfg.workdir) / 'checkpoints'} is "
                "kept" if state.last_saved is not None else "No checkpoint was saved before it")
        raise JaxtuneError(f"{what} at step {state.step}: training stopped. {kept}; lower train.lr or check the data")

    def log_window(self) -> dict:
        """One metrics.jsonl line for the steps since the last one; returns the progress-bar fields."""
        step, host = self.state.step, self.host
        event = {"step": step, "loss": self.loss, "lr": float(self.opt.lr_schedule(step - 1)),
                 "grad_norm": float(host["grad_norm"]), "tokens": int(host["tokens"]),
                 "tokens_per_s": round(self.window_tokens / (time.perf_counter() - self.window_start), 1)}
        self.log.write(event)
        self.window, self.window_tokens, self.window_start = None, 0, time.perf_counter()
        return {"loss": f"{self.loss:.4f}", "lr": f"{event['lr']:.2e}", "tok_s": f"{event['tokens_per_s']:.0f}"}

    def eval_and_keep_best(self) -> str:
        """Evaluate, keep a new best apart (best_checkpoint/), and decide on early stopping."""
        state, cfg = self.state, self.cfg
        eval_loss = evaluate(cfg, self.model, self.data, self.steps)
        self.log.write({"step": state.step, "eval_loss": eval_loss})
        if eval_loss < state.best["eval_loss"]:
            state.best = {"eval_loss": eval_loss, "step": state.step, "evals_since_best": 0}
            self.save(best=True)
        else:
            state.best["evals_since_best"] += 1
        if distributed.is_main():
            curves.plot(run_path(cfg.workdir), self.log.events, self.model.vocab_size)
        patience = cfg.eval.early_stopping_patience
        if patience and state.best["evals_since_best"] >= patience:
            state.stop_reason = (f"early stopping: no better eval loss for {patience} evals "
                                 f"(best at step {state.best['step']})")
        return f"step {state.step}: eval loss {eval_loss:.4f}"

    def save(self, *, best: bool = False):
        state = self.state
        meta = {"step": state.step, "data_state": self.opt.batches.state, "best": state.best}
        self.checkpoints.save(state.step, self.model.trainable, self.opt.state, meta, best=best)
        if not best:
            state.last_saved = state.step


def finish(cfg, model: Model, data: Data, state: LoopState, log: MetricsLog) -> dict:
    """curves.png, summary.json (losses, best step, why it stopped, the diagnosis), and a reply."""
    workdir = run_path(cfg.workdir)
    if distributed.is_main():
        curves.plot(workdir, log.events, model.vocab_size)
    train_points, eval_points = points(log.events, "loss"), points(log.events, "eval_loss")
    verdict = curves.diagnose_metrics(log.events, model.vocab_size)
    summary = {"steps": state.step, "final_loss": train_points[-1][1] if train_points else None,
               "first_eval_loss": eval_points[0][1] if eval_points else None,
               "final_eval_loss": eval_points[-1][1] if eval_points else None,
               "best_eval_loss": state.best["eval_loss"] if state.best["step"] else None,
               "best_step": state.best["step"], "stopped": state.stop_reason, "stopped_by_signal": state.stopped_by,
               **verdict}
    if distributed.is_main():
        write_text(workdir / "summary.json", json.dumps(summary, indent=2))
    if state.stop_reason:
        print(state.stop_reason)
    print(f"diagnosis: {verdict['diagnosis']} — {verdict['reason']}")
    if cfg.eval.prompt and not state.stop_reason:
        print(f"after: {reply(cfg, model, data)}")
    return summary


# --- the recipe ---------------------------------------------------------------------------------------

def train(cfg, *, progress=None) -> dict:
    """Run (or resume) the training described by a validated config; returns the summary.
    One training per workdir at a time: a second one is refused while this one holds the lock."""
    workdir = run_path(cfg.workdir)
    check_before_writing(cfg)
    with WorkdirLock(workdir, held=jax.process_index() == 0):  # hosts of one pod run share the workdir
        check_writable(workdir)
        data = setup_data(cfg)
        checkpoints, identity = open_run_dir(cfg, data)
        model = setup_model(cfg, data.model_dir)
        opt = setup_optimizer(cfg, model, data)
        steps = compile_steps(cfg, model, opt)
        state = restore(cfg, checkpoints, model, opt)
        if distributed.is_main():
            write_text(workdir / "config.json", json.dumps({**cfg.to_dict(), "identity": identity,
                                                            "resolved": {**opt.resolved, "remat": model.remat,
                                                                         "attention": model.attention,
                                                                         "quant": model.quant}},
                                                            indent=2))
        log = MetricsLog(workdir, state.step if state.last_saved is not None else None, cfg.log.tensorboard,
                         writer=distributed.is_main())
        if state.step == 0:
            if cfg.eval.prompt:
                print(f"before: {reply(cfg, model, data)}")
            if data.packed.val is not None:  # the baseline the curves and the summary compare against
                log.write({"step": 0, "eval_loss": evaluate(cfg, model, data, steps)})
                print(f"step 0: eval loss {log.events[-1]['eval_loss']:.4f}")
        show = cfg.log.progress if progress is None else progress
        state = Loop(cfg, data, model, opt, steps, checkpoints, state, log, progress=show).run()
        return finish(cfg, model, data, state, log)
