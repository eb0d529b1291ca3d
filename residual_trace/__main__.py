"""``python -m residual_trace`` runs the ``trace`` command line."""

from residual_trace.cli import main

if __name__ == "__main__":
    main()
