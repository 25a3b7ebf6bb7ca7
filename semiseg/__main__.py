"""`python -m semiseg ...` (and `torchrun -m semiseg train ...`)."""

from semiseg.cli import main

if __name__ == "__main__":
    main()
