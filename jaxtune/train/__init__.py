"""Training: the `jaxtune train` recipe and what it is made of.

    loop.py        the recipe: one function per phase (setup_data, open_run_dir, setup_model,
                   setup_optimizer, compile_steps, restore, run, finish), `train` calls them in order
    step.py        the pure, jitted train / eval steps (chunked float32 loss, accumulated grad norm)
    optim.py       the optax chain (clip -> AdamW -> MultiSteps), schedules, lr = "auto"
    checkpoint.py  orbax checkpoints with checksums, verified restore, disk and async-failure checks
    run_dir.py     the workdir's lock, writability and identity (what a resume must not change)
    metrics.py     metrics.jsonl: append, read back (torn last line tolerated)
    curves.py      curves.png and the diagnosis (underfit / overfit / well-fit / collapsed)

Imports run one way: loop -> everything else here; step, optim, checkpoint, run_dir, metrics import
nothing from this package but metrics (curves reads it). Nothing outside `jaxtune.train` imports loop
except the CLI.
"""
