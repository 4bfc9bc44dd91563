"""``python -m stratopt_ds.plan``: the memory planner, :mod:`stratopt_ds.memory` (one home)."""
from .memory import main

if __name__ == "__main__":
    main()
