"""``residlab dashboard export``: the dashboard of one experiment as a folder that opens from
``file://`` (no server), for sharing results. ``residlab serve`` shows the live dashboard."""

from __future__ import annotations

from residlab.options import CommandOptions, option

__all__ = ["DashboardExportOptions", "run_export"]


class DashboardExportOptions(CommandOptions):
    experiment: str = option(..., "the experiment to export (experiments/{name})")
    out_folder: str | None = option(None, "the folder to write (or --out); it must be new or "
                                    "empty", positional=True)
    out: str | None = option(None, "the folder to write (or give it as the last argument)")
    force: bool = option(False, "replace a previous export in that folder")
    experiments_dir: str | None = option(None, "the experiments folder (default: "
                                         "RESIDLAB_EXPERIMENTS_DIR or ./experiments)")
    noising_dir: str = option("noising/outputs", "the noising runner's output_dir whose runs "
                              "(answers and viz.html) the export holds")


def _out(options: DashboardExportOptions) -> str:
    from residlab.errors import UsageError

    if options.out is not None and options.out_folder not in (None, options.out):
        raise UsageError(f"two output folders given ({options.out_folder!r} and --out "
                         f"{options.out!r}); give one")
    out = options.out or options.out_folder
    if not out:
        raise UsageError(f"give the output folder: residlab dashboard export --experiment "
                         f"{options.experiment} OUT/")
    return out


def run_export(options: DashboardExportOptions) -> None:
    from pathlib import Path

    from residlab.errors import UsageError
    from residlab.experiments import experiments_root

    out = _out(options)
    try:
        from residlab.server.dashboard.export import export_dashboard
    except ModuleNotFoundError as error:
        if (error.name or "").startswith("residlab"):
            raise
        raise UsageError(f"the dashboard export needs {error.name}: pip install "
                         "'residlab[server]'") from None
    root = Path(options.experiments_dir) if options.experiments_dir else experiments_root()
    result = export_dashboard(root, options.experiment, Path(out), force=options.force,
                              noising_dir=Path(options.noising_dir))
    print(result)
