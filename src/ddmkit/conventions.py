"""The one time convention of ddmkit (stated here, referred to everywhere else), and the version
every file it writes records.

t in [0, 1], t = 0 is data, t = 1 is noise; x_t = (1 - t) x + t eps, eps ~ N(0, I); the velocity
target is v = eps - x; sampling integrates dx/dt = v from t = 1 down to t = 0; x0_hat = x_t - t v.
"""
from ddmkit.errors import DDMError, with_fix

__version__ = "0.1.0"
TIME_CONVENTION = "linear: x_t=(1-t)x+t*eps, v=eps-x, t=0 data"


def check_time_convention(found, where, fix: str | None = None) -> None:
    """A DDMError naming `where` (a model folder, a registry) when the time convention it records is not
    ddmkit's; it ends with `fix` where given (else: convert the model)."""
    if found != TIME_CONVENTION:
        raise DDMError(with_fix(f"{where}: time convention {found!r} differs from ddmkit's {TIME_CONVENTION!r}",
                                fix or "convert the model before mixing it"))
