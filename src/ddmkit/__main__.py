"""The `ddmkit` command: `python -m ddmkit` and the installed `ddmkit` script (ddmkit.cli, loaded here)."""
import ctypes
import os
import signal
import sys

# glibc's malloc settings for the command (mallopt's parameter numbers, malloc.h) and the variables that give
# them to the processes it starts: blocks up to 32 MB from the heap, and up to 256 MB of the heap's free top kept
MALLOC_SETTINGS = (("MALLOC_MMAP_THRESHOLD_", -3, 32 << 20), ("MALLOC_TRIM_THRESHOLD_", -1, 256 << 20))


def keep_freed_memory() -> None:
    """Have glibc's malloc keep the memory the command frees for its next allocations. By default it hands
    freed blocks of a few MB back to the system, and the next allocation page-faults them in anew: training
    and sampling free and allocate a batch's activations at every network call (8000 x 128 floats, 4 MB, in
    the demo), over a million faults a run. Set here for this process (mallopt) and, through the environment,
    for the processes it starts (expert pool workers, distributed ranks, a local Ray). A setting the user made
    in the environment is kept. Nothing where the C library is not glibc; what is computed does not change."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):  # no such confstr name (not glibc), or no mallopt to call
        return
    for variable, parameter, value in MALLOC_SETTINGS:
        if variable not in os.environ:  # the user's own is glibc's already, here and in the processes started
            os.environ[variable] = str(value)
            mallopt(parameter, value)


def main() -> None:
    """Load the command line and run it. Loading takes a second or two (torch); a Ctrl-C meanwhile stops the
    command as one later would (exit status 130), not with a traceback of the imports."""
    keep_freed_memory()
    try:
        from ddmkit.cli import main as run
    except KeyboardInterrupt:
        print("interrupted: nothing was done (ddmkit was still starting)", file=sys.stderr)
        sys.exit(130)
    try:
        run()
    except SystemExit as e:
        if e.code in (0, None):  # the work is done: a Ctrl-C during the interpreter's shutdown is no failure
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    main()
