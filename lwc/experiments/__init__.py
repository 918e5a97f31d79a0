"""absl entry points: `python -m lwc.experiments.<name> --flagfile=experiments/<name>.flags`."""
