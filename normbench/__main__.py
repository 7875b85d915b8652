"""`python -m normbench ...`: the same as the `normbench` command."""

from normbench.cli import main

if __name__ == "__main__":
    main()
