"""The training recipe, top to bottom: check, set up, fit, publish.

    from qwenvl_tune.config import build_config
    from qwenvl_tune.training.run import train
    run_dir = train(build_config("configs/qwen2_5_vl_3b_lora.yaml", {"data.path": "./Data"}))

Set-up happens in dependency order, each step able to fail before the costlier ones: the config and
the optional packages it needs, the Fabric accelerator/strategy, the run folder and its free space,
the data check, the model, the loop state (restored on resume). Then ``loop.fit`` trains, and
``last/`` (and ``best/`` if no validation chose one) are published from the final checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError
from ..data.records import DataError
from ..data.schema import learn_schema
from ..errors import TrainingInterrupted
from ..modeling.fastpath import FastPath
from ..modeling.load import (check_model_source, count_parameters, load_base_model, load_model_config,
                             load_processor, prepare_for_training, require_extras)
from ..rundir import CONFIG_FILE, RunDir, checkpoint_meta, copy_checkpoint, is_complete, trainer_state
from .console import Console
from .distributed import build_strategy, fabric_is_fsdp
from .loop import Loop, Stopped, fit, publish
from .setup import (check_output_dir, find_resume, loader_workers, resumed_config, run_folder, run_name,
                    setup_data, setup_loaders)
from .signals import StopRequest
from .state import Progress, load_state, restore_rng
from .step import TrainStep, build_scheduler


def train(config: Config, resume: str | None = None) -> Path:
    """Fine-tune per ``config``; returns the run folder (config.yaml, logs/, checkpoints/, best/, last/).

    With ``resume`` (a run folder, or "auto"), training continues from the newest complete
    checkpoint of that run: weights, optimizer and scheduler, step, position in the epoch and RNG.
    """
    ckpt = None
    if resume:
        found, ckpt = find_resume(resume, config)
        if ckpt is not None:
            config = resumed_config(found, config)
    config.validate()
    check_model_source(config.model.name_or_path)  # a mistyped local path fails before anything is written
    require_extras(config)  # e.g. bitsandbytes for qlora: one line, before any folder exists
    fabric = _setup_fabric(config)
    fabric.launch()  # data-parallel workers start here (they run this function too)
    main = fabric.is_global_zero
    fabric.seed_everything(config.train.seed, workers=True, verbose=False)
    existed = RunDir.at(config.run.output_dir, run_name(config)).exists()
    with run_folder(config, resuming=ckpt is not None, main=main) as run:  # held by this process until it ends
        return _train_in(run, fabric, config, ckpt, existed)


def _train_in(run: RunDir, fabric: Any, config: Config, ckpt: Path | None, existed: bool) -> Path:
    main = fabric.is_global_zero
    try:
        if main:
            check_output_dir(run, config)
            run.clean_stale()  # temporaries of a write that a kill interrupted
        log_version = run.next_log_version() if ckpt else ""
        _announce(config, run, ckpt, log_version, main)
        processor = load_processor(config.model.name_or_path, config.data.min_pixels, config.data.max_pixels)
        # a resume continues the loader where it stopped, so it needs the documents the checkpoint trained on
        # (a checkpoint from before this check carries no fingerprint)
        trained_on = checkpoint_meta(ckpt).get("data") if ckpt is not None else None
        train_rep, valid_rep = setup_data(config, processor, run, write=main, trained_on=trained_on)
        if main:  # resumed: with a longer length or the data's new place, for the next resume and for evaluate
            run.write_config(config)
        if main and ckpt is None:
            schema, said = learn_schema(train_rep.records)
            saved = run.write_schema(schema)
            print(said + (f" ({saved})" if saved else ""))
        fast = FastPath.resolve(config.model, load_model_config(config.model.name_or_path),
                                fsdp=fabric_is_fsdp(fabric), autocast=uses_autocast(config.train.precision),
                                cuda=fabric.device.type == "cuda")
        if main:
            print(fast.describe())
            said = loader_workers(config)[1]
            if said:
                print(said)
        auto = config.train.batch_size == "auto"
        loaders = (None, None) if auto else setup_loaders(config, processor, train_rep, valid_rep, fast)
        loop = _setup_loop(fabric, config, run, processor, *loaders, ckpt, log_version, fast, (train_rep, valid_rep))
        if auto and main:
            run.write_config(config)  # the size the probe chose: a resume trains with it
    except DataError:
        # the folder keeps data_problems.jsonl, which the message names (no config: not a run yet); a split that is
        # not there at all was found before anything was written, and leaves no folder
        if main and not existed and ckpt is None and not run.problems_path.exists():
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    except BaseException:
        if main and not existed and ckpt is None and not run.holds_training():
            shutil.rmtree(run.path, ignore_errors=True)  # a failed start leaves no stub run folder
        raise

    try:
        with loop.stop, fast.training(loop.module.module.model):
            final = fit(loop)
    except Stopped as e:
        raise TrainingInterrupted(run.path, e.checkpoint, e.reason) from None
    finally:
        loop.console.close()
    publish(loop, final, "last")
    if main and not is_complete(run.published("best")):
        # no validation chose one (e.g. it never ran): best/ is the final state, said so in its marker
        copy_checkpoint(run.published("last"), run.published("best"))
    fabric.barrier()
    cache = loop.module.module.features
    if cache is not None:
        loop.console.note(cache.describe() + ("" if fabric.world_size == 1 else " (this process)"))
    best = loop.progress.best_step
    loop.console.note(f"done: {run}  (best/: step {best if best is not None else loop.progress.step}, "
                      f"last/: step {loop.progress.step})")
    return run.path


def uses_autocast(precision: str) -> bool:
    """Whether a precision setting runs the model under autocast (mixed precision)."""
    return str(precision).endswith("-mixed") or str(precision) in ("16", "bf16")


def _setup_fabric(config: Config) -> Any:
    """Fabric for the accelerator, devices, strategy and precision: an impossible combination (FSDP on a
    CPU, a strategy whose package is missing) is a config error before any weights load."""
    from lightning_fabric import Fabric
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    t = config.train
    try:
        return Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                      strategy=build_strategy(t), precision=t.precision)
    except (ValueError, MisconfigurationException, RuntimeError, ImportError) as e:
        raise ConfigError(f"train.accelerator={t.accelerator!r}, train.strategy={t.strategy!r}, "
                          f"train.devices={t.devices}: {e}") from None


def _announce(config: Config, run: RunDir, ckpt: Path | None, log_version: str, main: bool) -> None:
    if not main:
        return
    if ckpt is not None:
        print(f"resuming {run} from {ckpt.name} (logs in logs/{log_version})")
        return
    changed = "\n".join(f"  {k}: {v}" for k, v in config.changed().items() if not k.startswith("run."))
    print(f"run folder: {run}\nconfig (what differs from the defaults; all of it in {run.path / CONFIG_FILE}):\n"
          f"{changed or '  (defaults)'}")


def _setup_loop(fabric: Any, config: Config, run: RunDir, processor: Any, train_loader: Any, val_loader: Any,
                ckpt: Path | None, log_version: str, fast: FastPath, data: tuple = ()) -> Loop:
    model = load_base_model(config.model)
    model = prepare_for_training(model, config, fast)
    trainable, total = count_parameters(model)
    if fabric.is_global_zero:
        print(f"model {config.model.name_or_path} [{config.model.method}]: {trainable:,} trainable of {total:,} "
              f"parameters ({100 * trainable / max(total, 1):.2f}%)")
    step = TrainStep(model.train(), fast, _feature_cache(model, config, fast, fabric))
    module = fabric.setup_module(step)
    module.mark_forward_method("generate")  # validation generates through the strategy's wrapper too
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(_adamw(params, config, fabric.device))
    if config.train.batch_size == "auto":
        _auto_batch_size(fabric, module, optimizer, config, processor, data[0], fast)
        train_loader, val_loader = setup_loaders(config, processor, *data, fast)
    if step.features is not None and train_loader is not None:
        step.features.flags = train_loader.dataset.kept  # kept rows' batches come from the loader without pixels
    loop = Loop(fabric, module, optimizer, None, train_loader, val_loader, run, processor, config, Progress(),
                StopRequest(announce=fabric.is_global_zero), None)
    loop.scheduler = build_scheduler(optimizer, config, loop.total_steps())
    rng = None
    if ckpt is not None:
        loop.progress, rng = load_state(fabric, trainer_state(ckpt), module, optimizer, loop.scheduler)
    if data:
        loop.progress.data = data[0].fingerprint  # computed once, when setup_data checked it
    loop.console = Console(fabric, _loggers(config, run, log_version) if fabric.is_global_zero else [],
                           loop.total_steps(), loop.progress.step, config.train.log_every_n_steps)
    if rng is not None:
        restore_rng(rng)  # last: nothing after this may draw random numbers before the first step
    return loop


def _feature_cache(model: Any, config: Config, fast: FastPath, fabric: Any) -> Any:
    """The image feature cache for this run (training/features.py), or None; said aloud either way."""
    from .features import ImageFeatureCache, cache_blocker

    gib, capped = config.train.image_cache_gib, ""
    if "train.image_cache_gib" not in config.explicit:
        # the default never takes more than a quarter of this machine's memory over the processes on it
        local = max(1, fabric.world_size // max(1, config.train.num_nodes))
        share = host_memory_gib() / 4 / local
        if share < gib:
            gib, capped = round(share, 2), " (a quarter of this machine's memory over its processes)"
    why = cache_blocker(model, fast, gib, fsdp=fabric_is_fsdp(fabric))
    if fabric.is_global_zero:
        print(f"image feature cache: off ({why})" if why else
              f"image feature cache: up to {gib:g} GiB of host memory per process{capped}; epochs after the first "
              f"skip the frozen vision tower for the documents kept")
    return None if why else ImageFeatureCache(model, gib)


def host_memory_gib() -> float:
    """This machine's physical memory in GiB (inf where the system does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _auto_batch_size(fabric: Any, module: Any, optimizer: Any, config: Config, processor: Any, train_rep: Any,
                     fast: FastPath) -> None:
    """Resolve ``train.batch_size=auto`` in ``config`` (and the accumulation, unless the user set it)."""
    from .autobatch import accumulation_for, probe_batch_size
    from .setup import longest_batches

    t = config.train
    if fabric.device.type != "cuda":
        t.batch_size = 2
        note = "train.batch_size=auto: 2 (no CUDA device to measure)"
    else:
        probe = probe_batch_size(fabric, module, optimizer, longest_batches(config, processor, train_rep, fast),
                                 len(train_rep.records), t.auto_batch_memory, fast)
        t.batch_size = probe.chosen
        note = probe.describe()
    if "train.accumulate_grad_batches" not in config.explicit:
        t.accumulate_grad_batches = accumulation_for(t.batch_size)
        note += f"; {t.accumulate_grad_batches} micro-batch(es) per optimizer step"
    if fabric.is_global_zero:
        print(note)


def _adamw(params: list, config: Config, device: Any) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel per step) on a GPU: it also skips a non-finite step on the device, so the loop
    need not wait for the GPU before each update (loop.optimizer_step)."""
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay,
                             **({"fused": True} if fused else {}))


def _loggers(config: Config, run: RunDir, version: str) -> list[Any]:
    import warnings

    from lightning_fabric.loggers import CSVLogger, TensorBoardLogger

    # the CSV logger's folder also holds the TensorBoard one; it would only ever replace its own metrics.csv
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    tensorboard = TensorBoardLogger(run.logs_dir, name=version, version="tensorboard")
    tensorboard.log_hyperparams({k: str(v) if isinstance(v, list) or v is None else v for k, v in config.flat().items()})
    # flushed every step: a step's loss is in metrics.csv before any checkpoint that follows it
    return [CSVLogger(run.path, name=run.logs_dir.name, version=version, flush_logs_every_n_steps=1), tensorboard]
