"""`tinyalign-export` / `tinyalign export`: a thin click wrapper over `tinyalign.export.export_bundle`."""

from __future__ import annotations

import click

@click.command("export")
@click.option("--target", required=True, help="ios | android | macos | desktop")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--bank", type=click.Path(exists=True, file_okay=False), help="Memory bank (needed with retrieval).")
@click.option("--out", type=click.Path(), required=True, help="Bundle folder to write.")
@click.option("--quantize", default="fp32", show_default=True, help="fp32 | 8w | 8da4w | fp16 (Core ML targets)")
@click.option("--bank-key-dtype", type=click.Choice(["f16", "i8", "f32"]), help="Re-encode the bank's keys.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--allow-drift", is_flag=True, help="Write the bundle even if exported outputs drift past the thresholds.")
def export_command(target, checkpoint, bank, out, quantize, bank_key_dtype, force, allow_drift):
    """Quantize, lower and check a checkpoint, and write a device bundle beside its bank.

    \b
    Examples:
      tinyalign-export --target desktop --checkpoint runs/ft --bank runs/bank --out bundles/desktop
      tinyalign-export --target ios --checkpoint runs/ft --bank runs/bank --out bundles/ios --quantize 8da4w
    """
    from .export import export_bundle  # validates target and preset itself, naming the choices

    try:
        path = export_bundle(checkpoint=checkpoint, bank=bank, out=out, target=target, quantize=quantize, force=force,
                             allow_drift=allow_drift, bank_key_dtype=bank_key_dtype)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"bundle: {path}")
