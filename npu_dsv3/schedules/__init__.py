"""Pipeline schedules without a model: per-rank operation orders (``plan``) and their
event simulation (``simulator``) for megatron-core 1F1B, interleaved 1F1B and DualPipeV."""

from npu_dsv3.schedules.plan import SCHEDULES, Op, Plan, ScheduleError, plan, validate
from npu_dsv3.schedules.simulator import Costs, DeadlockError, Simulation, formula_bubble, simulate

__all__ = ["SCHEDULES", "Op", "Plan", "ScheduleError", "plan", "validate",
           "Costs", "DeadlockError", "Simulation", "formula_bubble", "simulate"]
