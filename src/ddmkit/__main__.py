"""The `ddmkit` command: `python -m ddmkit` and the installed `ddmkit` script (ddmkit.cli, loaded here)."""
import signal
import sys


def main() -> None:
    """Load the command line and run it. Loading takes a second or two (torch); a Ctrl-C meanwhile stops the
    command as one later would (exit status 130), not with a traceback of the imports."""
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
