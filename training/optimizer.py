"""`python -m training.optimizer --build-kernels`: compile HybridAdam's kernels once per node, before the first run.

The command keeps the name the docs and error messages give it; the optimizer code is training/engine/optimizer.py.
"""
from training.engine.optimizer import load_kernels, main, toolchain_problem  # noqa: F401 - this command's API

if __name__ == "__main__":
    main()
