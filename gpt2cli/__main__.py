"""`python -m gpt2cli` (torchrun re-runs the tool this way)."""

from gpt2cli.cli import main

if __name__ == "__main__":
    main()
