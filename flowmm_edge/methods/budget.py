"""How many cells a merge keeps: one type for every entry point.

A budget is a fixed number of cells, or a ratio of the cells it is applied to. Who applies it
decides what that is: a merge applies it to the cells it finds (eval's 10%), the engine to a
slot's share of the buffer once, when it starts (`serve --budget 0.5` with 4 slots of 2048 cells
keeps 1024 per conversation), so a user's ratio never drifts with the conversation's length.

    Budget.of(0.1).keep(4096)                     # 410: a ratio of what it is applied to
    Budget.parse("24MiB", bytes_per_cell=12288)   # Budget(cells=2048)
    Budget.of(512).slots(n=4096, protected=36)    # 512, checked against what a plan can keep
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from ..errors import MethodError

SIZE = re.compile(r"([0-9.]+)\s*(KiB|MiB|GiB|KB|MB|GB)", re.IGNORECASE)


class BudgetError(MethodError):
    pass


@dataclasses.dataclass(frozen=True)
class Budget:
    cells: int | None = None    # a fixed number of cells
    ratio: float | None = None  # or a ratio in (0, 1] of the cells it is applied to

    def __post_init__(self):
        if (self.cells is None) == (self.ratio is None):
            raise BudgetError("a budget is either a cell count or a ratio")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:  # NaN fails too
            raise BudgetError(f"budget ratio {self.ratio} is outside (0, 1]")
        if self.cells is not None and self.cells < 1:
            raise BudgetError(f"budget of {self.cells} cells must be at least 1")

    @classmethod
    def of(cls, value) -> "Budget":
        """A Budget from a program's value: an int is cells, a float a ratio."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise BudgetError(f"budget {value!r} is neither a ratio nor a cell count")
        if isinstance(value, (float, np.floating)):
            return cls(ratio=float(value))
        return cls(cells=int(value))

    @classmethod
    def parse(cls, value, bytes_per_cell: float = 0) -> "Budget":
        """A Budget from a user's text: a ratio ("0.25"), a cell count ("512") or memory ("24MiB",
        cells of `bytes_per_cell` each); a number is taken as `of` takes it."""
        if not isinstance(value, str):
            return cls.of(value)
        text = value.strip()
        m = SIZE.fullmatch(text)
        if m:
            if bytes_per_cell <= 0:
                raise BudgetError(f"budget {value!r} is a size, but this cache's bytes per cell are unknown")
            scale = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2)[0].lower()]
            return cls(cells=max(1, int(float(m.group(1)) * scale // bytes_per_cell)))
        try:
            return cls.of(int(text) if re.fullmatch(r"[0-9]+", text) else float(text))
        except ValueError:
            raise BudgetError(f"budget {value!r} is not a ratio (0.25), a cell count (512) or a size (24MiB)") from None

    def keep(self, n: int) -> int:
        """Cells kept out of n: the count, or ceil(ratio x n) and at least 1."""
        return self.cells if self.cells is not None else max(1, math.ceil(self.ratio * n))

    def slots(self, n: int, protected: int) -> int:
        """Slots a plan over n cells keeps, checked: a count must lie in [1, n], and no budget may
        keep fewer than the `protected` cells (sinks and recent window) every plan keeps."""
        if self.cells is not None and self.cells > n:
            raise BudgetError(f"budget of {self.cells} slots is outside [1, {n}] (the context holds {n} cells)")
        slots = self.keep(n)
        if slots < min(protected, n):
            raise BudgetError(f"budget of {slots} slots is smaller than the {protected} always kept "
                              "(sinks + recent window)")
        return slots

    def __str__(self) -> str:
        return f"{self.cells} cells" if self.cells is not None else f"{self.ratio:g} of the cells"
