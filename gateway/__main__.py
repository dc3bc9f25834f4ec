"""``python -m gateway`` is the ``pgqg`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="pgqg")
