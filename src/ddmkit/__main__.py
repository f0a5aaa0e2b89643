"""The `ddmkit` command: `python -m ddmkit` and the installed `ddmkit` script (ddmkit.cli, loaded here)."""
import sys


def main() -> None:
    """Load the command line and run it. Loading takes a second or two (torch); a Ctrl-C meanwhile stops the
    command as one later would (exit status 130), not with a traceback of the imports."""
    try:
        from ddmkit.cli import main as run
    except KeyboardInterrupt:
        print("interrupted: nothing was done (ddmkit was still starting)", file=sys.stderr)
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
