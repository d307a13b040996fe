"""``python -m veil`` runs the veil command line."""

from veil.cli.main import main

if __name__ == "__main__":
    main()
