"""What a Megatron run reports about our optimizers and the model.

* :mod:`.sphere_logging` / :mod:`.spectra_logging` -- per-interval statistics of the sphere and
  SPECTRA optimizers (solver calls, lambda, norms, clip ratios) for Megatron's logger and
  TensorBoard, as Bridge callbacks;
* :mod:`.monitoring` -- opt-in per-iteration metrics (train/val loss, exact spectral norms per module
  kind, activation RMS and max-abs, norm gains, router MaxVio) written as JSON lines.

Reads optimizers through :mod:`..optimizers`' face only. Callers: the CLI launcher, tests' probes.
"""

from .. import lazy_face

FACE = {
    "sphere_logging": ("sphere_logging_callback", "sphere_stats", "sphere_optimizers", "log_sphere_stats",
                       "exact_norm_errors", "probe"),
    "spectra_logging": ("spectra_logging_callback", "spectra_stats", "spectra_optimizers", "update_probe"),
    "monitoring": ("monitor_environment", "callbacks_from_env", "monitoring_callback", "ENV_PATH"),
}
__getattr__ = lazy_face(__name__, FACE)
__all__ = sorted(name for names in FACE.values() for name in names)
