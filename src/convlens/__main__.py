"""``python -m convlens``: the ``convlens`` command line (the same entry point as the console script)."""

if __name__ == "__main__":
    from convlens.cli.main import app

    app(prog_name="convlens")
