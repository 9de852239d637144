"""`jaxtune train`: a recipe to read top to bottom.

model onto the mesh -> LoRA or full split -> data (preflight first) -> optimizer -> resume if the
workdir has checkpoints -> steps (metrics stay on device until a log step) -> eval / early stopping /
checkpoints -> curves.png, summary.json.
"""
from __future__ import annotations

import functools
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import lora, sharding
from jaxtune.atomic import write_text
from jaxtune.config import flatten, split_list
from jaxtune.data import loader
from jaxtune.data.formats import FormatOptions
from jaxtune.errors import JaxtuneError
from jaxtune.models.hf import from_pretrained, load_tokenizer, resolve_model_path
from jaxtune.train import curves, optim, run_dir
from jaxtune.train.checkpoint import Checkpoints
from jaxtune.train.run_dir import WorkdirLock, check_writable
from jaxtune.train.step import make_eval_step, make_train_step


class MetricsLog:
    """metrics.jsonl (one JSON object per log or eval event), optionally mirrored to TensorBoard."""

    def __init__(self, workdir: Path, resume_step: int | None, tensorboard: bool):
        """Keep the events up to the resumed step (none on a fresh start): the steps after it are redone."""
        self.path = workdir / "metrics.jsonl"
        kept = [m for m in curves.read_metrics(workdir) if resume_step is not None and m["step"] <= resume_step]
        write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self.events = kept
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # optional

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, event: dict):
        self.events.append(event)
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        if self.tb:
            for k, v in event.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, event["step"])


class StopSignal:
    """SIGTERM (preemptible TPU VMs) and SIGINT ask the loop to checkpoint and exit at the next step."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def eval_batches(rows: dict, batch: int, max_batches: int):
    """Fixed-shape batches over every validation row; the last is padded with zero-weight rows."""
    n = len(rows["tokens"])
    starts = list(range(0, n, batch))[: max_batches or None]
    for s in starts:
        idx = np.arange(s, s + batch) % n
        chunk = {k: v[idx] for k, v in rows.items()}
        chunk["weights"] = np.where((np.arange(s, s + batch) < n)[:, None], chunk["weights"], 0).astype(np.float32)
        yield chunk


def reply(model, tokenizer, model_dir, prompt: str, max_new_tokens: int) -> str:
    from jaxtune.generate import generate, prompt_ids, stop_token_ids

    [ids] = generate(model, [prompt_ids(tokenizer, prompt, chat=bool(tokenizer.chat_template))],
                     max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer, model_dir))
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def train(cfg, *, progress=None) -> dict:
    """Run (or resume) the training described by a validated config; returns the summary.
    One training per workdir at a time: a second one is refused while this one holds the lock."""
    workdir = Path(cfg.workdir)
    with WorkdirLock(workdir, held=jax.process_index() == 0):  # hosts of one pod run share the workdir
        return _train(cfg, workdir, cfg.log.progress if progress is None else progress)


def _train(cfg, workdir: Path, show: bool) -> dict:
    check_writable(workdir)

    # --- data: preflight before anything (a big model) loads ------------------------------------
    model_dir = str(resolve_model_path(cfg.model.path))
    tokenizer = load_tokenizer(model_dir)
    opts = FormatOptions(cfg.data.format, cfg.data.seq_len, cfg.data.train_on_inputs, cfg.data.overlong,
                         cfg.data.chat_template or None)
    data = loader.build(split_list(cfg.data.train), model_dir, opts, val_sources=split_list(cfg.data.val),
                        val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    print(f"train data:\n{data.train_report.text()}")
    if data.val_report is not None:
        print(f"validation data:\n{data.val_report.text()}")
    data.train_report.check()

    # --- the run's identity: a resume must be the same run (checked before anything is written) -----
    flat_cfg = flatten(cfg.to_dict())
    ident = run_dir.identity(Path(model_dir), data.train)
    checkpoints = Checkpoints(workdir, cfg.checkpoint.keep)
    if checkpoints.any():
        run_dir.check_resume(workdir, flat_cfg, ident, split_list(cfg.resume.allow_changes))

    # --- mesh and model ----------------------------------------------------------------------------
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.micro_batch_size % batch_ways:
        raise JaxtuneError(f"train.micro_batch_size={cfg.train.micro_batch_size} must be a multiple of "
                           f"mesh data x fsdp = {batch_ways}")
    if cfg.model.verify:
        from jaxtune.export import verify_model

        verify_model(model_dir)
    model = from_pretrained(model_dir, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            remat=cfg.model.remat, mesh=mesh)
    lora.attach_from_config(model, cfg.to_dict())
    graphdef, trainable, frozen = lora.split_trainable(model, cfg.method, cfg.lora.modules_to_save)
    trainable_shardings = sharding.state_shardings(trainable, mesh)
    trainable = jax.device_put(trainable, trainable_shardings)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_total = n_trainable + sum(x.size for x in jax.tree.leaves(frozen))
    print(f"model {model_dir}: {n_total / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable "
          f"({cfg.method}), mesh {dict(mesh.shape)}")

    k = cfg.train.grad_accum_steps
    rows_per_update = cfg.train.micro_batch_size * k
    batches = loader.Batches(data.train, rows_per_update, seed=cfg.seed)
    steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * batches.steps_per_epoch))
    epochs = steps / batches.steps_per_epoch

    if cfg.train.lr == "auto":
        peak_lr, arithmetic = optim.auto_lr(cfg.train.base_lr, data.train_report.supervised_tokens, steps, epochs,
                                            cfg.train.pretrained_batch_tokens)
        print(arithmetic)
    else:
        peak_lr = float(cfg.train.lr)
    lr_schedule = optim.schedule(cfg.train.schedule, peak_lr, steps, cfg.train.warmup_steps)
    tx = optim.optimizer(lr_schedule, weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                         b1=cfg.train.b1, b2=cfg.train.b2, grad_accum_steps=k)
    opt_shardings = sharding.follow_params(jax.eval_shape(tx.init, trainable), trainable, trainable_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
    resolved = {**cfg.to_dict(), "identity": ident,
                "resolved": {"peak_lr": peak_lr, "steps": steps, "epochs": epochs,
                             "steps_per_epoch": batches.steps_per_epoch, "vocab_size": model.cfg.vocab_size,
                             "supervised_tokens_per_epoch": data.train_report.supervised_tokens}}

    # --- compiled steps with explicit shardings ---------------------------------------------------
    batch_sharding = sharding.named_sharding(("batch", "length"), (cfg.train.micro_batch_size, cfg.data.seq_len), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: batch_sharding for name in data.train}
    step_fn = make_train_step(graphdef, tx, cfg.train.loss_chunk)
    eval_fn = make_eval_step(graphdef, cfg.train.loss_chunk)

    def in_mesh(fn):
        @functools.wraps(fn)
        def wrapped(*args):
            with sharding.use_mesh(mesh):
                return fn(*args)
        return wrapped

    train_step = jax.jit(in_mesh(step_fn), donate_argnums=(0, 2),
                         in_shardings=(trainable_shardings, frozen_shardings, opt_shardings, batch_shardings,
                                       replicated, replicated),
                         out_shardings=(trainable_shardings, opt_shardings, replicated))
    eval_step = jax.jit(in_mesh(eval_fn), in_shardings=(trainable_shardings, frozen_shardings, batch_shardings),
                        out_shardings=replicated)

    def to_device(local: dict) -> dict:
        return {name: jax.make_array_from_process_local_data(batch_sharding, v) for name, v in local.items()}

    def evaluate(trainable) -> float | None:
        if data.val is None:
            return None
        sums = [eval_step(trainable, frozen, to_device(b))
                for b in eval_batches(data.val, cfg.train.micro_batch_size, cfg.eval.max_batches)]
        loss_sum, tokens = np.sum(jax.device_get(sums), axis=0)
        return float(loss_sum / max(tokens, 1))

    # --- resume from the newest checkpoint that verifies --------------------------------------------
    step, best = 0, {"eval_loss": math.inf, "step": None, "evals_since_best": 0}
    restored = checkpoints.restore_latest(trainable, opt_state)
    if restored is not None:
        trainable, opt_state, meta = restored
        step, best = meta["step"], meta["best"]
        batches.state = meta["data_state"]
        print(f"resumed from {workdir / 'checkpoints'} at step {step}")
    write_text(workdir / "config.json", json.dumps(resolved, indent=2))
    log = MetricsLog(workdir, step if restored is not None else None, cfg.log.tensorboard)

    def save(trainable, opt_state, *, best_copy=False):
        meta = {"step": step, "data_state": batches.state, "best": best}
        checkpoints.save(step, trainable, opt_state, meta, best=best_copy)

    if step == 0:
        if cfg.eval.prompt:
            print(f"before: {reply(nnx.merge(graphdef, trainable, frozen), tokenizer, model_dir, cfg.eval.prompt, cfg.eval.max_new_tokens)}")
        if data.val is not None:  # the baseline the curves and the summary compare against
            log.write({"step": 0, "eval_loss": evaluate(trainable)})
            print(f"step 0: eval loss {log.events[-1]['eval_loss']:.4f}")

    # --- the loop -----------------------------------------------------------------------------------
    from tqdm import tqdm

    base_key = jax.random.key(cfg.seed)
    micro = cfg.train.micro_batch_size // jax.process_count()
    window = None  # on-device sums since the last log step
    window_tokens, window_start = 0, time.perf_counter()
    last_saved = step if restored is not None else None
    stop_reason, stopped_by = None, None
    bar = tqdm(total=steps, initial=step, disable=not show, unit="step", dynamic_ncols=True)

    def finite_or_halt(loss: float, param_norm: float):
        if not (math.isfinite(loss) and math.isfinite(param_norm)):
            checkpoints.wait()
            what = f"loss is {loss}" if not math.isfinite(loss) else f"the parameters became {param_norm}"
            kept = (f"The last good checkpoint (step {last_saved}) in {workdir / 'checkpoints'} is kept" if last_saved
                    is not None else "No checkpoint was saved before it")
            raise JaxtuneError(f"{what} at step {step}: training stopped. {kept}; lower train.lr or check the data")

    with StopSignal() as stop:
        while step < steps:
            local, supervised = batches.next_step()
            norm = jnp.float32(max(supervised, 1) / k)
            for i in range(k):
                chunk = {name: v[i * micro:(i + 1) * micro] for name, v in local.items()}
                window_tokens += int((chunk["segment_ids"] > 0).sum()) * jax.process_count()
                rng = jax.random.fold_in(base_key, step * k + i)
                trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, to_device(chunk), norm, rng)
                window = metrics if window is None else {
                    **metrics, "loss_sum": window["loss_sum"] + metrics["loss_sum"],
                    "tokens": window["tokens"] + metrics["tokens"]}
            step += 1
            bar.update(1)
            checkpoints.check()  # a failed background save stops the run now, not steps later
            at_log = step % cfg.log.every_steps == 0 or step == steps
            at_eval = (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == steps
            signalled = stop.received  # read once: a signal arriving after this is handled at the next step
            at_save = step % cfg.checkpoint.every_steps == 0 or step == steps or signalled
            if at_log or at_save or at_eval:
                host = jax.device_get(window)
                loss = float(host["loss_sum"] / max(host["tokens"], 1))
                finite_or_halt(loss, float(host["param_norm"]))
            if at_log:
                elapsed = time.perf_counter() - window_start
                event = {"step": step, "loss": loss, "lr": float(lr_schedule(step - 1)),
                         "grad_norm": float(host["grad_norm"]), "tokens": int(host["tokens"]),
                         "tokens_per_s": round(window_tokens / elapsed, 1)}
                log.write(event)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:.0f}")
                window, window_tokens, window_start = None, 0, time.perf_counter()
            if at_eval and data.val is not None:
                eval_loss = evaluate(trainable)
                log.write({"step": step, "eval_loss": eval_loss})
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
                if eval_loss < best["eval_loss"]:
                    best = {"eval_loss": eval_loss, "step": step, "evals_since_best": 0}
                    save(trainable, opt_state, best_copy=True)
                else:
                    best["evals_since_best"] += 1
                curves.plot(workdir, log.events, model.cfg.vocab_size)
                patience = cfg.eval.early_stopping_patience
                if patience and best["evals_since_best"] >= patience:
                    stop_reason = f"early stopping: no better eval loss for {patience} evals (best at step {best['step']})"
            if at_save or stop_reason:
                save(trainable, opt_state)
                last_saved = step
            if signalled and step < steps:
                stop_reason = f"{signalled} received: checkpoint saved at step {step}; re-run to resume"
                stopped_by = signalled
            if stop_reason:
                break
    bar.close()
    try:
        checkpoints.wait()
    finally:
        checkpoints.close()

    # --- the end: curves, summary, a reply --------------------------------------------------------
    curves.plot(workdir, log.events, model.cfg.vocab_size)
    train_points = [(m["step"], m["loss"]) for m in log.events if "loss" in m]
    eval_points = [(m["step"], m["eval_loss"]) for m in log.events if "eval_loss" in m]
    verdict = curves.diagnose_metrics(log.events, model.cfg.vocab_size)
    summary = {"steps": step, "final_loss": train_points[-1][1] if train_points else None,
               "first_eval_loss": eval_points[0][1] if eval_points else None,
               "final_eval_loss": eval_points[-1][1] if eval_points else None,
               "best_eval_loss": best["eval_loss"] if best["step"] else None, "best_step": best["step"],
               "stopped": stop_reason, "stopped_by_signal": stopped_by, **verdict}
    write_text(workdir / "summary.json", json.dumps(summary, indent=2))
    if stop_reason:
        print(stop_reason)
    print(f"diagnosis: {verdict['diagnosis']} — {verdict['reason']}")
    if cfg.eval.prompt and not stop_reason:
        print(f"after: {reply(nnx.merge(graphdef, trainable, frozen), tokenizer, model_dir, cfg.eval.prompt, cfg.eval.max_new_tokens)}")
    return summary
