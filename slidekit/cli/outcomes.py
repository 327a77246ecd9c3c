"""`slidekit outcomes patients | km | baseline`: survival and regression endpoints per patient
(docs/outcomes.md). Training is `slidekit train mil --set task=survival|regression`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from slidekit.cli.common import handle_errors, option, quiet_option
from slidekit.slidelevel.outcomes import km_from_oof, meanpool_baseline, patient_bags


@click.group("outcomes")
@quiet_option
def outcomes() -> None:
    """Survival and regression per patient: pool patients' slides, Kaplan–Meier plots, the linear baseline."""


@outcomes.command("patients")
@click.argument("clinical", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("slide_table", type=click.Path(dir_okay=False, path_type=Path))
@option("out", type=click.Path(file_okay=False, path_type=Path), required=True,
        detail="folder for bags/<patient>.h5 and one MIL table per endpoint (<endpoint>.csv).")
@option("survival")
@option("regression")
@option("patient_column")
@quiet_option
@handle_errors
def patients_cmd(clinical: Path, slide_table: Path, out: Path, survival: tuple[str, ...], regression: tuple[str, ...],
                 patient_column: str | None) -> None:
    """Pool each patient's slides into one bag; write one MIL table per endpoint.

    CLINICAL: one row per patient (patient, time and event columns, targets). SLIDE_TABLE:
    patient,features[,slide] (each patient's feature files)."""
    pairs = []
    for s in survival:
        time, _, event = s.partition(":")
        if not time or not event:
            raise click.BadParameter(f"{s!r} is not TIME:EVENT", param_hint="--survival")
        pairs.append((time, event))
    tables = patient_bags(clinical, slide_table, out, survival=pairs or None, regression=list(regression),
                          patient_column=patient_column)
    for name, path in tables.items():
        click.echo(f"{name}: {path}")


@outcomes.command("km")
@click.argument("oof", type=click.Path(dir_okay=False, path_type=Path))
@option("out", type=click.Path(dir_okay=False, path_type=Path), default=None,
        detail="the Kaplan–Meier PNG to write (without it: groups, numbers at risk and the log-rank p only).")
@option("cutoffs")
@option("json")
@quiet_option
@handle_errors
def km_cmd(oof: Path, out: Path | None, cutoffs: str | None, as_json: bool) -> None:
    """Kaplan–Meier curves of a survival run's oof.csv by predicted risk group, numbers at risk, log-rank p."""
    try:
        cuts = [float(x) for x in cutoffs.split(",")] if cutoffs else None
    except ValueError:
        raise click.BadParameter(f"{cutoffs!r} is not comma-separated numbers", param_hint="--cutoffs") from None
    km = km_from_oof(oof, out, cutoffs=cuts, title=oof.parent.name)
    if as_json:
        click.echo(json.dumps(km, indent=2))
        return
    for g in km["groups"]:
        click.echo(f"{g['name']}: {g['n']} patients, {g['events']} events, at risk {g['at_risk']} "
                   f"at {km['at_risk_times']}")
    click.echo(f"log-rank p = {km['p']:.3g}")
    if km["png"]:
        click.echo(f"wrote {km['png']}")


@outcomes.command("baseline")
@click.argument("table", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("oof", type=click.Path(dir_okay=False, path_type=Path))
@option("out", type=click.Path(dir_okay=False, path_type=Path), default=None,
        detail="the baseline's out-of-fold table (CSV: slide, fold, risk|predicted).")
@option("json")
@quiet_option
@handle_errors
def baseline_cmd(table: Path, oof: Path, out: Path | None, as_json: bool) -> None:
    """Mean-pooled CoxNet (survival) or ridge (regression) on the folds of a trained MIL run.

    TABLE: the MIL table the run trained on; OOF: the run's oof.csv."""
    res = meanpool_baseline(table, oof, out)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    head = "c_index" if res["kind"] == "survival" else "r2"
    click.echo(f"mean-pooled {'CoxNet' if head == 'c_index' else 'ridge'} {head} {res['overall'][head]:.3f}, "
               f"MIL {res['mil_overall'][head]:.3f} (MIL - baseline {res['diff'][head]:+.3f}, same folds)")


def register(main: click.Group) -> None:
    main.add_command(outcomes)
