"""`slidekit train NAME --config FILE --out DIR`: run any registered trainer."""
from __future__ import annotations

from pathlib import Path

import click

import trainers
from slidekit.base.resources import configure_threads
from slidekit.cli.common import (
    cohort_folder_option,
    device_option,
    handle_errors,
    option,
    quiet_flag,
    quiet_option,
    stain_options,
    threads_option,
)
from trainers.catalog import list_trainers
from trainers.describe import show_config as render_config


@click.command()
@click.argument("name", required=False)
@option("config")
@option("out", type=click.Path(file_okay=False, path_type=Path), default=None,
        detail="directory (checkpoint.pt, metrics.csv, ...). Rerunning resumes or continues.")
@option("set")
@cohort_folder_option("mil: train on it (slides whose embed is not done are left out, one warning each); same as "
                      "--set cohort=EMBED_OUT.")
@option("init")
@option("init_bn")
@option("weights", detail="With --init timm:NAME.")
@stain_options(norm_help="Stain-normalise every training batch to --stain-ref (recorded in the checkpoint, so "
                          "heatmap/embed apply it too); same as --set stain_norm=...")
@option("stain_aug")
@option("restart")
@option("list")
@option("show_config")
@option("nproc")
@device_option
@threads_option
@quiet_option
@handle_errors
@click.pass_context
def train(ctx: click.Context, name: str | None, config: Path | None, out: Path | None,
          overrides: tuple[str, ...], init: str | None, weights: str | None,
          init_bn: str | None,
          restart: bool, list_only: bool, device: str, show_config: bool = False, threads: int | None = None,
          nproc: int | None = None,
          stain_norm: str | None = None, stain_ref: str | None = None, stain_aug: str | None = None,
          cohort: str | None = None) -> None:
    """Train model NAME (see --list) from a config file; writes a self-describing checkpoint."""
    if list_only or name is None:
        click.echo("\n".join(list_trainers()))
        return
    if show_config:
        click.echo(render_config(name), nl=False)
        return
    if out is None:
        raise click.UsageError("--out is required")
    if nproc is not None:  # the ranks rerun this command without --nproc (and --restart, done here once)
        from slidekit.base.distributed import launch

        if restart:
            trainers.restart_run(out, trainers.get(name))
        launch(nproc, _rank_args(ctx, quiet_flag(ctx)))  # rank 0 prints the checkpoint
        return
    from slidekit.models.weights import init_overrides

    items = list(overrides) + init_overrides(init, weights, init_bn)
    # the stain flags are config options (trainers/batches.py): given here, they win over --config
    # (and giving one again with --set is refused as given twice)
    items += [f"{k}={v}" for k, v in (("stain_norm", stain_norm), ("stain_ref", stain_ref),
                                      ("stain_aug", stain_aug)) if v is not None]
    if cohort is not None:  # a config option of mil (trainers/mil.py); another trainer refuses it by name
        items.append(f"cohort={cohort}")

    # DataLoader workers run one thread each (torch sets that in its workers): the rest is the model's.
    configure_threads(threads, _num_workers(name, config, items))
    from slidekit.base.distributed import is_main, peer_lost

    with peer_lost():  # a launched rank whose peer died ends quietly: the launcher says which rank and why
        ckpt = trainers.train(name, config, out, overrides=items, device=device,
                              progress=not quiet_flag(ctx), restart=restart)

    if is_main():  # one line for a job of several ranks
        click.echo(str(ckpt))


def _num_workers(name: str, config: Path | None, overrides: list[str]) -> int:
    """The run's ``num_workers``, read from the config the trainer builds (a bad config is refused
    here with the trainer's own error)."""
    return trainers.load_config(trainers.get(name).Config, config, overrides).num_workers


def register(group: click.Group) -> None:
    """Add `train` to the main group."""
    group.add_command(train)


def _rank_args(ctx: click.Context, quiet: bool) -> list[str]:
    """This `train` command line as each rank runs it: every option given, less --nproc/--restart."""
    args = ["train", ctx.params["name"]]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if not isinstance(p, click.Option) or p.name in ("nproc", "restart", "quiet") or value in (None, False, ()):
            continue
        if value == p.default:
            continue
        opt = max(p.opts, key=len)
        if p.is_flag:
            args.append(opt)
        elif p.multiple:
            for v in value:
                args += [opt, str(v)]
        else:
            args += [opt, str(value)]
    return args + (["--quiet"] if quiet else [])
