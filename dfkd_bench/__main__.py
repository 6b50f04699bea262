"""``python -m dfkd_bench``: the command line, also as torchrun's entry point
(``torchrun --nproc_per_node=N -m dfkd_bench run ...``)."""

from .cli import main

if __name__ == "__main__":
    main()
