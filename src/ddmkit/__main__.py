"""`python -m ddmkit`: the ddmkit command (ddmkit.cli), for scripts that name the interpreter itself."""
from ddmkit.cli import main

main()
